"""Training-free repair with a test-time register (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

1. **Find the register neurons.** Scan the model; where outlier tokens exist, record every MLP hidden unit's
   post-activation (the output of each ``*.act`` module of blocks ``0 .. max_layer``; ``max_layer`` defaults to the
   onset layer) and rank the units by their mean absolute activation at outlier positions. The top ``k`` are the
   register neurons.
2. **Install the register.** At inference one extra zero-initialised token is inserted after the prefix tokens
   (before block 0, no position embedding, like a trained register); up to the block of the first register neuron
   no token attends to it, so image tokens compute exactly what they did there; in every register neuron the activation is
   moved off the image tokens: set to zero on all other tokens and, on the register, to the maximum the neuron
   reached over the image's tokens. This is done per neuron and per image (the reference code edits batch element 0
   only and uses one value per layer).

The neuron list is saved with the weights in a self-describing checkpoint (``meta.extra["test_time_register"]``), so
every command loads the fixed model by path with the repair applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, NotAViTError
from .loading import LoadedModel, load_model
from .report import JsonResult

EXTRA_KEY = "test_time_register"


@dataclass
class RegisterNeuron:
    """One MLP hidden unit: where it lives and how it behaves at outlier vs normal patch positions."""

    block: int
    site: str  # module path inside the model, e.g. "blocks.2.mlp.act"
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



def _neuron_sites(model: nn.Module, max_layer: int) -> dict[str, tuple[int, nn.Module]]:
    """Post-activation modules (``*.act``) of blocks 0..max_layer, by module path."""
    sites = {}
    for b in range(max_layer + 1):
        for name, module in model.blocks[b].named_modules():
            if name.split(".")[-1] == "act":
                sites[f"blocks.{b}.{name}"] = (b, module)
    if not sites:
        raise NotAViTError("no MLP activation modules (`*.act`) found in the blocks; cannot locate register neurons")
    return sites


def _check_supported(loaded: LoadedModel) -> None:
    from timm.models.vision_transformer import VisionTransformer

    # Rotary-embedding models (Eva) tie token positions to fixed prefix counts inside attention; an inserted token
    # would shift them, so refuse rather than silently change the model.
    if not isinstance(loaded.model, VisionTransformer):
        raise NotAViTError(f"{loaded.name}: test-time registers are supported for timm VisionTransformer models; "
                           "rotary-embedding models (Eva) are not")


@torch.inference_mode()
def find_register_neurons(loaded: LoadedModel, images: Any, report: Any, *, top_k: int = 4,
                          max_layer: int | None = None, device: torch.device | str = "cpu",
                          batch_size: int = 32) -> TestTimeRegister:
    """Rank MLP hidden units by mean |activation| at the outlier positions of ``report`` (a scan of ``images``)."""
    from .scan import _batches, make_image_source

    num_blocks = len(loaded.blocks)
    if report.onset_layer is None:
        raise InputError("nothing to fix: the scan found no outlier tokens")
    max_layer = report.onset_layer if max_layer is None else max_layer
    if not 0 <= max_layer < num_blocks:
        raise InputError(f"--max-layer {max_layer} is outside the model: choose a block from 0 to {num_blocks - 1}")
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    sites = _neuron_sites(loaded.model, max_layer)
    P = loaded.num_prefix_tokens
    gh, gw = loaded.grid_size
    outlier_pos: dict[int, set[int]] = {}
    for o in report.outliers:  # positions flagged at any block from the onset on (tokens stay in place)
        if o.layer < num_blocks:
            outlier_pos.setdefault(o.image_index, set()).add(o.row * gw + o.col)

    sums: dict[str, list[torch.Tensor]] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda m, i, out, name=name: captured.__setitem__(name, out.detach()))
               for name, (_, module) in sites.items()]
    try:
        source = make_image_source(images, loaded)
        for x, indices, _ in _batches(source, batch_size, 0):
            if x is None:
                continue
            loaded.model.forward_features(x.to(device))
            mask = torch.zeros(len(indices), gh * gw, dtype=torch.bool)
            for j, i in enumerate(indices.tolist()):
                for p in outlier_pos.get(i, ()):
                    mask[j, p] = True
            mask = mask.to(device)
            for name, act in captured.items():
                patches = act[:, P:].abs().float()  # [B, N, H]
                out_sum = (patches * mask[..., None]).sum(dim=(0, 1))
                norm_sum = (patches * (~mask)[..., None]).sum(dim=(0, 1))
                acc = sums.setdefault(name, [torch.zeros_like(out_sum), torch.zeros_like(norm_sum)])
                acc[0] += out_sum
                acc[1] += norm_sum
            n_out = int(mask.sum())
            n_norm = int((~mask).sum())
            sums.setdefault("__counts__", [torch.zeros(1), torch.zeros(1)])
            sums["__counts__"][0] += n_out
            sums["__counts__"][1] += n_norm
    finally:
        for h in handles:
            h.remove()
    n_out, n_norm = (float(c) for c in sums.pop("__counts__"))
    if n_out == 0:
        raise InputError("nothing to fix: no outlier positions among the images")
    candidates = []
    for name, (out_sum, norm_sum) in sums.items():
        block = sites[name][0]
        scores = out_sum / n_out
        normal = norm_sum / max(n_norm, 1.0)
        for idx in torch.argsort(scores, descending=True)[:top_k].tolist():
            candidates.append(RegisterNeuron(block, name, idx, float(scores[idx]), float(normal[idx])))
    candidates.sort(key=lambda n: -n.outlier_activation)
    return TestTimeRegister(candidates[:top_k], num_blocks, int(loaded.model.embed_dim), max_layer, loaded.name)


class _RegisterInstaller:
    """Hooks that insert the register token before block 0 and move the register neurons' activation onto it."""

    def __init__(self, loaded: LoadedModel, register: TestTimeRegister):
        self.position = loaded.num_prefix_tokens  # after CLS and trained registers, before the patches
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        modules = dict(loaded.model.named_modules())
        by_site: dict[str, list[int]] = {}
        for n in register.neurons:
            if n.site not in modules:
                raise InputError(f"neuron file does not match the model: {loaded.name} has no module {n.site}")
            by_site.setdefault(n.site, []).append(n.index)
        self.handles.append(loaded.model.blocks[0].register_forward_pre_hook(self._insert, with_kwargs=True))
        # Up to and including the first block with a register neuron (whose attention runs before its MLP fills the
        # register), image tokens attend as if the register were absent: it is masked out as a key, so they compute
        # exactly what they did. An untrained extra key would perturb every token.
        first = min(n.block for n in register.neurons) if register.neurons else -1
        for block in list(loaded.model.blocks)[:first + 1]:
            self.handles.append(block.register_forward_pre_hook(self._hide_register, with_kwargs=True))
        for site, idx in by_site.items():
            self.handles.append(modules[site].register_forward_hook(self._move(torch.tensor(sorted(idx)))))

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

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            if idx.max() >= out.shape[-1]:
                raise InputError(f"neuron file does not match the model: neuron {int(idx.max())} of a layer with "
                                 f"{out.shape[-1]} units")
            out = out.clone()
            i = idx.to(out.device)
            peak = out[:, :, i].amax(dim=1)  # [B, k]: per image and per neuron
            out[:, :, i] = 0
            out[:, pos, i] = peak
            return out
        return hook


def apply_test_time_register(loaded: LoadedModel, register: TestTimeRegister) -> LoadedModel:
    """Install the register on ``loaded`` (in place) and return it; its token counts include the new register."""
    _check_supported(loaded)
    if register.num_blocks != len(loaded.blocks) or register.embed_dim != int(loaded.model.embed_dim):
        raise InputError(f"neuron file does not match the model: it was made for {register.num_blocks} blocks of "
                         f"width {register.embed_dim}, {loaded.name} has {len(loaded.blocks)} of width "
                         f"{int(loaded.model.embed_dim)}")
    _RegisterInstaller(loaded, register)
    loaded.model.num_prefix_tokens += 1  # so average pooling and every downstream split skip the register
    loaded.num_prefix_tokens += 1
    loaded.num_register_tokens += 1
    loaded.notes.append(f"test-time register installed (Jiang et al. 2025): {len(register.neurons)} neurons moved "
                        f"onto token reg{loaded.num_register_tokens - 1}")
    return loaded


# ----------------------------------------------------------------------------------------------- the fix command
@dataclass
class FixReport(JsonResult):
    """Before/after of a test-time register repair."""

    model: str
    images: str
    neurons: list[RegisterNeuron]
    max_layer: int
    before_outlier_fraction: float
    after_outlier_fraction: float
    before_max_over_median: float
    after_max_over_median: float
    outliers_removed: float
    prediction_agreement: float | None
    feature_cosine_mean: float
    feature_cosine_min: float
    verdict: str
    saved_to: str | None = None
    notes: list[str] = field(default_factory=list)
    schema: str = "artifactscan.fix/1"



@torch.inference_mode()
def _outputs(loaded: LoadedModel, images: Any, device: torch.device, batch_size: int) -> tuple[torch.Tensor, ...]:
    from .scan import _batches, make_image_source

    source = make_image_source(images, loaded)
    feats, logits = [], []
    for x, _, _ in _batches(source, batch_size, 0):
        if x is None:
            continue
        tokens = loaded.model.forward_features(x.to(device))
        feats.append(loaded.model.forward_head(tokens, pre_logits=True).float().cpu())
        logits.append(loaded.model.forward_head(tokens).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def fix(model: Any = None, images: Any = None, *, top_k: int = 4, max_layer: int | None = None,
        threshold: str | float = "auto", out: str | Path | None = None, device: str = "auto",
        batch_size: int = 32) -> FixReport:
    """Find the register neurons on ``images``, install a test-time register, and report before vs after."""
    from .checkpoint import CheckpointMeta, save_checkpoint
    from .scan import resolve_device, scan

    dev = resolve_device(device)
    loaded = load_model(model)
    _check_supported(loaded)
    if loaded.meta is not None and EXTRA_KEY in loaded.meta.extra:
        raise InputError(f"{loaded.name} already carries a test-time register; fix the original model instead")
    loaded.model.to(dev)
    before = scan(loaded, images, threshold=threshold, device=str(dev), batch_size=batch_size, num_maps=0)
    if before.onset_layer is None:
        return FixReport(loaded.name, before.images.source, [], -1, 0.0, 0.0, before.last_block.max_over_median,
                         before.last_block.max_over_median, 0.0, None, 1.0, 1.0,
                         "nothing to fix: the scan found no outlier tokens", notes=list(loaded.notes))
    register = find_register_neurons(loaded, images, before, top_k=top_k, max_layer=max_layer, device=dev,
                                     batch_size=batch_size)
    feats0, logits0 = _outputs(loaded, images, dev, batch_size)
    apply_test_time_register(loaded, register)
    after = scan(loaded, images, threshold=threshold, device=str(dev), batch_size=batch_size, num_maps=0)
    feats1, logits1 = _outputs(loaded, images, dev, batch_size)
    cos = torch.nn.functional.cosine_similarity(feats0, feats1, dim=-1)
    agreement = (float((logits0.argmax(-1) == logits1.argmax(-1)).float().mean())
                 if logits0.shape[-1] > 1 and logits0.shape[-1] != feats0.shape[-1] else None)
    b_frac = sum(lay.num_outliers for lay in before.layers if not lay.is_final_norm)
    a_frac = sum(lay.num_outliers for lay in after.layers if not lay.is_final_norm)
    removed = 1 - a_frac / b_frac if b_frac else 0.0
    saved = None
    if out is not None:
        if loaded.meta is None:
            raise InputError("--out needs a model loaded from a self-describing checkpoint or built-in name; "
                             "the neuron list is printed in the JSON report instead")
        extra = dict(loaded.meta.extra)
        extra[EXTRA_KEY] = register.to_dict()
        meta = CheckpointMeta(**{**asdict(loaded.meta), "extra": extra,
                                 "description": (loaded.meta.description + " + test-time register").strip()})
        saved = str(save_checkpoint(out, loaded.model.state_dict(), meta))
    verdict = (f"The test-time register removed {removed:.0%} of the outlier tokens (last block "
               f"{before.last_block.outlier_fraction:.2%} -> {after.last_block.outlier_fraction:.2%}); the model's "
               f"pooled features keep cosine {float(cos.mean()):.4f} (min {float(cos.min()):.4f}) with the original's"
               + (f", top-1 agreement {agreement:.1%}." if agreement is not None else "."))
    return FixReport(loaded.name, before.images.source, register.neurons, register.max_layer,
                     before.last_block.outlier_fraction, after.last_block.outlier_fraction,
                     before.last_block.max_over_median, after.last_block.max_over_median, removed, agreement,
                     float(cos.mean()), float(cos.min()), verdict, saved, list(loaded.notes))
