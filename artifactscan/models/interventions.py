"""Interventions on a model's forward, on the capture layer's hook points: the test-time register (Jiang et al.
2025), one extra token that the register neurons' activation is moved onto.

``artifactscan fix`` (:mod:`artifactscan.analysis.fix`) finds the neurons; this module installs them on a model
(:func:`install_test_time_register`: a handle whose ``remove()`` restores the model exactly) and registers itself
with the loader as a checkpoint extension, so a checkpoint written by ``fix --out`` (which records the neurons in
``meta.extra["test_time_register"]``) loads with the repair applied, whatever was imported first.

Neurons live at unit hook points (``blocks.{i}.mlp.post``, the phantom's ``blocks.{i}.artifact_units.post``).
Checkpoints written by artifactscan 0.2 name module paths instead (``blocks.2.mlp.act``); they still load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from artifactscan.core.errors import CheckpointMetadataError, InputError, NotAViTError
from artifactscan.core.results import JsonResult
from artifactscan.models.hooks import resolve_point
from artifactscan.models.loading import LoadedModel
from artifactscan.models.registry import register_checkpoint_extension

EXTRA_KEY = "test_time_register"


@dataclass
class RegisterNeuron:
    """One MLP hidden unit: where it lives and how it behaves at outlier vs normal patch positions."""

    block: int
    site: str  # the unit hook point, e.g. "blocks.2.mlp.post" (0.2 wrote the module path "blocks.2.mlp.act")
    index: int
    outlier_activation: float  # mean |activation| at outlier positions
    normal_activation: float  # mean |activation| at normal patch positions


@dataclass
class TestTimeRegister(JsonResult):
    """What ``fix`` installs: the neurons and the model they belong to."""

    __test__ = False  # not a pytest test class, despite the name

    neurons: list[RegisterNeuron]
    num_blocks: int
    embed_dim: int
    max_layer: int
    model_name: str


def check_supported(loaded: LoadedModel) -> None:
    """Refuse models an inserted token would silently change (anything but a timm ``VisionTransformer``)."""
    from timm.models.vision_transformer import VisionTransformer

    # Rotary-embedding models (Eva) tie token positions to fixed prefix counts inside attention; an inserted token
    # would shift them, so refuse rather than silently change the model.
    if not isinstance(loaded.model, VisionTransformer):
        raise NotAViTError(f"{loaded.name}: test-time registers are supported for timm VisionTransformer models; "
                           "rotary-embedding models (Eva) are not")


#: Module paths of unit points as artifactscan 0.2 recorded them (``site``), and the hook point each one is now.
LEGACY_SITES = {".mlp.act": ".mlp.post", ".artifact_units.act": ".artifact_units.post"}


def unit_site(site: str) -> str:
    """The hook point a recorded ``site`` names (0.2's module paths mapped to their hook names)."""
    for old, new in LEGACY_SITES.items():
        if site.endswith(old):
            return site[: -len(old)] + new
    return site


class TestTimeRegisterHandle:
    """An installed test-time register: the hooks that insert the register token before block 0 and move the
    register neurons' activation onto it, and the token counts it raised. :meth:`remove` undoes all of it."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, loaded: LoadedModel, register: "TestTimeRegister"):
        self.loaded = loaded
        self.position = loaded.num_prefix_tokens  # after CLS and trained registers, before the patches
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            self._install(register)
        except BaseException:
            self.remove()
            raise
        loaded.model.num_prefix_tokens += 1  # so average pooling and every downstream split skip the register
        loaded.num_prefix_tokens += 1
        loaded.num_register_tokens += 1
        self.note = (f"test-time register installed (Jiang et al. 2025): {len(register.neurons)} neurons moved "
                     f"onto token reg{loaded.num_register_tokens - 1}")
        loaded.notes.append(self.note)
        self.installed = True

    def _install(self, register: "TestTimeRegister") -> None:
        model = self.loaded.model
        by_site: dict[str, list[int]] = {}
        for n in register.neurons:
            by_site.setdefault(unit_site(n.site), []).append(n.index)
        targets = {}
        for site in by_site:
            try:
                targets[site] = resolve_point(model, site)
            except InputError:
                raise InputError(f"neuron file does not match the model: {self.loaded.name} has no unit point "
                                 f"{site}") from None
            if not targets[site][1].unit:
                raise InputError(f"neuron file does not match the model: {site} is not a unit hook point")
        first_block, _ = resolve_point(model, "blocks.0.resid_pre")
        self.handles.append(first_block.register_forward_pre_hook(self._insert, with_kwargs=True))
        # Up to and including the first block with a register neuron (whose attention runs before its MLP fills the
        # register), image tokens attend as if the register were absent: it is masked out as a key, so they compute
        # exactly what they did. An untrained extra key would perturb every token.
        first = min(n.block for n in register.neurons) if register.neurons else -1
        for b in range(first + 1):
            block, _ = resolve_point(model, f"blocks.{b}.resid_pre")
            self.handles.append(block.register_forward_pre_hook(self._hide_register, with_kwargs=True))
        for site, idx in by_site.items():
            module, point = targets[site]
            move = self._move(torch.tensor(sorted(idx)))
            if point.where == "input":
                self.handles.append(module.register_forward_pre_hook(lambda m, args, f=move: (f(args[0]),) + args[1:]))
            else:
                self.handles.append(module.register_forward_hook(lambda m, args, out, f=move: f(out)))

    def _insert(self, module: nn.Module, args: tuple, kwargs: dict):
        x = args[0]
        reg = torch.zeros(x.shape[0], 1, x.shape[2], dtype=x.dtype, device=x.device)
        x = torch.cat([x[:, :self.position], reg, x[:, self.position:]], dim=1)
        return (x,) + tuple(args[1:]), kwargs

    def _hide_register(self, module: nn.Module, args: tuple, kwargs: dict):
        x = args[0]
        T = x.shape[1]
        mask = torch.zeros(1, 1, T, T, dtype=x.dtype, device=x.device)
        mask[..., self.position] = float("-inf")
        return args, {**kwargs, "attn_mask": mask}

    def _move(self, idx: torch.Tensor):
        pos = self.position

        def move(out: torch.Tensor) -> torch.Tensor:
            if idx.max() >= out.shape[-1]:
                raise InputError(f"neuron file does not match the model: neuron {int(idx.max())} of a layer with "
                                 f"{out.shape[-1]} units")
            out = out.clone()
            i = idx.to(out.device)
            peak = out[:, :, i].amax(dim=1)  # [B, k]: per image and per neuron
            out[:, :, i] = 0
            out[:, pos, i] = peak
            return out
        return move

    def remove(self) -> None:
        """Take the register out: hooks removed, token counts and notes as before the install."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if getattr(self, "installed", False):
            self.loaded.model.num_prefix_tokens -= 1
            self.loaded.num_prefix_tokens -= 1
            self.loaded.num_register_tokens -= 1
            if self.note in self.loaded.notes:
                self.loaded.notes.remove(self.note)
            self.installed = False

    def __enter__(self) -> "TestTimeRegisterHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_test_time_register(loaded: LoadedModel, register: "TestTimeRegister") -> TestTimeRegisterHandle:
    """Install the register on ``loaded`` (its module and token counts change) until the handle's ``remove()``;
    usable as a context manager."""
    check_supported(loaded)
    if register.num_blocks != len(loaded.blocks) or register.embed_dim != int(loaded.model.embed_dim):
        raise InputError(f"neuron file does not match the model: it was made for {register.num_blocks} blocks of "
                         f"width {register.embed_dim}, {loaded.name} has {len(loaded.blocks)} of width "
                         f"{int(loaded.model.embed_dim)}")
    return TestTimeRegisterHandle(loaded, register)


def apply_test_time_register(loaded: LoadedModel, register: "TestTimeRegister") -> LoadedModel:
    """Install the register on ``loaded`` **in place**, for good, and return it (its token counts include the new
    register). To measure and then restore the model, use :func:`install_test_time_register`."""
    install_test_time_register(loaded, register)
    return loaded


def _checked(data: Any) -> TestTimeRegister:
    """The register a checkpoint records, or ``checkpoint metadata invalid: extra.test_time_register...: <why>``."""
    field = f"extra.{EXTRA_KEY}"

    def bad(where: str, why: str) -> CheckpointMetadataError:
        return CheckpointMetadataError(field + where, why, "")

    def is_int(v: Any, least: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not isinstance(data, dict):
        raise bad("", f"must be a JSON object, got {type(data).__name__}")
    for key, least in (("num_blocks", 1), ("embed_dim", 1), ("max_layer", 0)):
        if not is_int(data.get(key), least):
            raise bad(f".{key}", f"must be an integer >= {least}, got {data.get(key)!r}")
    neurons = data.get("neurons")
    if not isinstance(neurons, list) or not neurons:
        raise bad(".neurons", f"must be a non-empty list, got {neurons!r}"[:200])
    for i, n in enumerate(neurons):
        if not isinstance(n, dict):
            raise bad(f".neurons[{i}]", f"must be a JSON object, got {type(n).__name__}")
        if not isinstance(n.get("site"), str) or not n["site"]:
            raise bad(f".neurons[{i}].site", f"must be a unit hook point such as 'blocks.2.mlp.post', got {n.get('site')!r}")
        for key in ("block", "index"):
            if not is_int(n.get(key)):
                raise bad(f".neurons[{i}].{key}", f"must be an integer >= 0, got {n.get(key)!r}")
    return TestTimeRegister.from_dict({**data, "model_name": str(data.get("model_name", "")),
                                       "neurons": [{"outlier_activation": 0.0, "normal_activation": 0.0, **n}
                                                   for n in neurons]})


def _install_from_checkpoint(loaded: LoadedModel, data: Any) -> None:
    apply_test_time_register(loaded, _checked(data))


register_checkpoint_extension(EXTRA_KEY, _install_from_checkpoint)
