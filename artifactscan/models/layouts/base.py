"""What a family module declares about its checkpoints, so the loader can dispatch through one table
(:mod:`artifactscan.models.layouts.table`) instead of knowing any family itself.

A family module holds, for each layout its files come in: how to recognise them (their keys, or the ``model_type``
of a Hugging Face ``config.json``), what to drop as not part of the image encoder, how to convert them to a timm
model (through that family's own timm ``checkpoint_filter_fn`` where timm has one), its prefix tokens, and the
known timm configurations a bare state dict of the family is matched against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
#: ``(timm name, family, width, patch size)``: one row of the table bare state dicts are matched against
KnownConfig = tuple[str, str, int, int]
#: ``(what it is, the keys' pattern)``: keys dropped by name as not part of the image encoder
DropRule = tuple[str, re.Pattern]


def no_drops(sd: StateDict) -> Sequence[DropRule]:
    return ()


@dataclass(frozen=True)
class FileLayout:
    """A checkpoint file's native key layout.

    Attributes:
        name: what ``LoadedModel.layout`` records (``dinov2``, ``openai_clip`` ...; ``timm`` for timm's own keys).
        family: the family of the shape table preferred among equivalent matches of a file in this layout.
        recognise: whether a state dict (wrappers removed) is in this layout, by its keys alone.
        to_timm: ``(state dict, target model or None, file name) -> timm state dict``; with no model only keys are
            renamed (to read a bare file's shapes before any model exists).
        drop: the rules naming the keys that are not the image encoder (the rest must load strictly).
        inspect: ``(state dict, file name) -> (data config, notes)``: what the layout itself says about preprocessing,
            after refusing a file that lacks a piece of the layout.
        refusal: for a layout recognised only to be refused (not a ViT): the error, given the file name.
        prefix_tokens: the prefix tokens its models have, in words (the loader counts them from the model).
    """

    name: str
    family: str | None
    recognise: Callable[[StateDict], bool]
    to_timm: Callable[[StateDict, nn.Module | None, str], StateDict] | None = None
    drop: Callable[[StateDict], Sequence[DropRule]] = no_drops
    inspect: Callable[[StateDict, str], tuple[dict[str, Any], list[str]]] | None = None
    refusal: Callable[[str], Exception] | None = None
    prefix_tokens: str = ""


@dataclass(frozen=True)
class FolderLayout:
    """Hugging Face ``save_pretrained`` folders of some ``model_type``s, converted into one registered timm
    architecture.

    Attributes:
        model_types: ``{config model_type: transformers class}``.
        arch: the registered architecture that builds the converted model (its kwargs are JSON, so a checkpoint saved
            from it reloads).
        build: that architecture's builder.
        convert: ``(HF state dict, vision config, folder name) -> (timm state dict, {dropped part: keys})``.
        config_kwargs: the builder's kwargs from the vision config alone (checked before any weight is read) ...
        weight_kwargs: ... or from the config and the converted weights ``(vision, model_type, state dict)``.
        vision_config: the vision part of a whole config (CLIP-style models nest it).
        preprocessing: ``(folder, data config or None, vision config, HF state dict, kwargs) -> (data config,
            notes)`` where the family's preprocessing is not only ``preprocessor_config.json``.
        prefix_tokens: the prefix tokens its models have, in words.
    """

    model_types: dict[str, str]
    arch: str
    build: Callable[..., nn.Module]
    convert: Callable[[StateDict, dict[str, Any], str], tuple[StateDict, dict[str, int]]]
    config_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    weight_kwargs: Callable[[dict[str, Any], str, StateDict], dict[str, Any]] | None = None
    vision_config: Callable[[dict[str, Any], str], dict[str, Any]] = lambda config, model_type: config
    preprocessing: Callable[[Path, dict[str, Any] | None, dict[str, Any], StateDict, dict[str, Any]],
                            tuple[dict[str, Any], list[str]]] | None = None
    prefix_tokens: str = ""


@dataclass(frozen=True)
class Family:
    """What a family module hands the table: its file and folder layouts, and its known configurations."""

    name: str
    files: tuple[FileLayout, ...] = ()
    folders: tuple[FolderLayout, ...] = ()
    known: tuple[KnownConfig, ...] = field(default_factory=tuple)


def known(family: str, *rows: tuple[str, int, int]) -> tuple[KnownConfig, ...]:
    """``(timm name, width, patch)`` rows of one family as shape-table entries."""
    return tuple((name, family, width, patch) for name, width, patch in rows)


def vit_filter(sd: StateDict, model: nn.Module | None, adapt_layer_scale: bool = False) -> StateDict:
    """timm's own ``vision_transformer.checkpoint_filter_fn`` (DINOv2 hub, OpenAI / OpenCLIP, MAE, DeiT-III with
    ``adapt_layer_scale``). Without a model it is given a stand-in whose ``pos_embed`` is ``None`` and whose patch
    embedding is the file's own, so it renames keys and resamples nothing."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if model is None:
        patch = next((v for k, v in sd.items() if k.endswith("patch_embed.proj.weight") or k.endswith("conv1.weight")),
                     None)
        model = SimpleNamespace(pos_embed=None, patch_embed=SimpleNamespace(  # type: ignore[assignment]
            proj=SimpleNamespace(weight=patch)), head=None)
    return dict(checkpoint_filter_fn(dict(sd), model, adapt_layer_scale=adapt_layer_scale))  # type: ignore[arg-type]
