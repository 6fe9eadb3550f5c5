"""Sorting a Hugging Face state dict's keys onto timm's, the part every family's converter shares: what is kept
(renamed), what is dropped as not part of the image encoder (counted by its top-level name, for the load notes),
what no rule knows (refused, never silently ignored), and the separate q/k/v projections fused into timm's ``qkv``.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from artifactscan.core.errors import ModelLoadError

#: A layer's separate attention projections, as transformers 5 names them in these families.
QKV_PROJ = re.compile(r"attention\.([qkv])_proj\.(weight|bias)")


class KeySorter:
    """Collects a converter's decisions key by key; :meth:`finish` refuses unknown keys and fuses q/k/v."""

    def __init__(self) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.dropped: dict[str, int] = {}
        self.unknown: list[str] = []
        self.qkv: dict[tuple[int, str, str], torch.Tensor] = {}  # (block, q|k|v, weight|bias)

    def drop(self, key: str) -> None:
        """A key of a part that is not the image encoder (a text tower, a head ...)."""
        what = key.split(".")[0]
        self.dropped[what] = self.dropped.get(what, 0) + 1

    def layer_key(self, i: int, rest: str, value: torch.Tensor, renames: dict[str, str]) -> bool:
        """Key ``rest`` of layer ``i``: a q/k/v projection kept to be fused, or renamed by the first prefix of
        ``renames`` it starts with; False when no rule knows it."""
        if m := QKV_PROJ.fullmatch(rest):
            self.qkv[(i, m.group(1), m.group(2))] = value
            return True
        target = next((t + rest[len(s):] for s, t in renames.items() if rest.startswith(s)), None)
        if target is None:
            return False
        self.out[f"blocks.{i}.{target}"] = value
        return True

    def finish(self, family: str, name: str = "", blocks: Iterable[int] = ()) -> dict[str, torch.Tensor]:
        """The converted state dict: unknown keys refused in one line; each block's q/k/v fused (a part present
        for some of q, k, v but not all is refused, and so is a block in ``blocks`` without q/k/v weights)."""
        where = f"{name}: " if name else ""
        if self.unknown:
            more = f" (+{len(self.unknown) - 4} more)" if len(self.unknown) > 4 else ""
            raise ModelLoadError(f"{where}unexpected keys in the {family} weights: {', '.join(self.unknown[:4])}"
                                 + more)
        for i, part in sorted({(i, part) for i, _, part in self.qkv} | {(i, "weight") for i in blocks}):
            parts = [self.qkv.get((i, p, part)) for p in "qkv"]
            absent = [p for p, t in zip("qkv", parts) if t is None]
            if absent:
                raise ModelLoadError(f"{where}block {i} has no attention {'/'.join(absent)}_proj {part}")
            self.out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(parts, 0)  # type: ignore[arg-type]
        return self.out


def timm_mlp_ratio(width: int, hidden: int) -> float:
    """The ``mlp_ratio`` that makes timm build exactly ``hidden`` MLP units (timm takes ``int(width * ratio)``: a
    ratio a hair too small loses a unit)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width
