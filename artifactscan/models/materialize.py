"""Weights into a model without waste: a safetensors file read tensor by tensor straight into the dtype the model will
hold, a model built on the meta device (no random initialisation, no second copy), the tensors assigned to it, and
the non-persistent buffers a meta build leaves empty computed afterwards. And the precision the weights are held in.

Why read() and not a memory map: pages of a mapped file that the forward touches count in the process's resident
memory on top of any converted copy, and a mapped file that a trainer truncates while we use it kills the process with
SIGBUS. Reading each tensor into its own buffer costs the weights once, and a file cut short while it is read is a
short read: one clear error, never a crash. A PyTorch zip file is memory-mapped by ``torch.load`` (a training
checkpoint's optimizer state is then never read), and the weights it holds are copied out of the mapping at once
(:func:`own_copies`): the model never runs on pages of a file that a trainer may truncate while a scan runs.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from artifactscan.core.errors import CheckpointMetadataError, InputError, ModelLoadError, ResourceError, option
from artifactscan.core.memory import GIB, available_bytes
from artifactscan.core.paths import display_name
from artifactscan.models import native
from artifactscan.models.checkpoint import META_KEY, CheckpointMeta, parse_meta_json
from artifactscan.models.hooks import cast_inputs_to_weights

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISION_DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"{option('precision')} must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@dataclass
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


@dataclass
class SafetensorsHeader:
    """What a safetensors file holds, read from its header alone (no tensor data)."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    size: int
    mtime_ns: int

    def float_elements(self) -> int:
        return sum(math.prod(e.shape) for e in self.entries.values() if e.dtype.is_floating_point)

    def dominant_float_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most of the file's bytes (the checkpoint's own precision)."""
        return dominant_float_dtype([self])


def dominant_float_dtype(headers: list[SafetensorsHeader]) -> torch.dtype | None:
    """The floating dtype holding most of the bytes of these files (a sharded checkpoint's own precision)."""
    totals: dict[torch.dtype, int] = {}
    for e in (e for header in headers for e in header.entries.values()):
        if e.dtype.is_floating_point:
            totals[e.dtype] = totals.get(e.dtype, 0) + e.end - e.start
    return max(totals, key=totals.__getitem__) if totals else None


def _damaged(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{display_name(path)} is not a readable safetensors file: {why}")


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header: every tensor must lie inside the file as it is now (a truncated file is refused
    here, before any tensor is read)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise _damaged(path, "the file is empty (0 bytes); it was probably cut short while being written")
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"header too small: the file holds {st.st_size} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, st.st_size - 8):
            raise _damaged(path, f"header too large: it claims {length:,} bytes and the file holds {st.st_size:,}")
        try:
            raw = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _damaged(path, f"invalid header: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _damaged(path, "invalid header: not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    base, entries = 8 + length, {}
    for name, info in raw.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise _damaged(path, f"tensor {name!r} spans {end - begin} bytes, its shape {list(shape)} needs {nbytes}")
        if base + end > st.st_size:
            raise _damaged(path, f"it is truncated: tensor {name!r} ends at byte {base + end:,} and the file holds "
                                 f"{st.st_size:,} (cut short while being written?)")
        entries[name] = TensorEntry(dtype, shape, base + begin, base + end)
    return SafetensorsHeader(path, entries, metadata, st.st_size, st.st_mtime_ns)


def _read_exactly(f: Any, into: torch.Tensor, path: Path, name: str) -> None:
    view, done = memoryview(into.numpy()).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ModelLoadError(f"{display_name(path)} was cut short while being read (tensor {name!r}); a trainer "
                                 "may still be writing it: load it again once it is complete")
        done += n


def read_safetensors(header: SafetensorsHeader, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``header``'s file, floating ones converted to ``dtype`` tensor by tensor (None: as stored).

    The file's size and modification time are compared before and after: a file rewritten meanwhile is refused."""
    path, out = header.path, {}
    with open(path, "rb", buffering=0) as f:
        for name, e in sorted(header.entries.items(), key=lambda item: item[1].start):  # in file order
            buf = torch.empty(e.end - e.start, dtype=torch.uint8)
            f.seek(e.start)
            _read_exactly(f, buf, path, name)
            t = buf.view(e.dtype).reshape(e.shape) if e.end > e.start else torch.empty(e.shape, dtype=e.dtype)
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
        check_unchanged(path, header.size, header.mtime_ns, os.fstat(f.fileno()))
    return out


def check_unchanged(path: Path, size: int, mtime_ns: int, opened: os.stat_result | None = None) -> None:
    """Refuse a file whose size or modification time differs from what they were before it was read (``opened``: the
    stat of the descriptor it was read through; a file replaced by rename has another inode under the same name)."""
    try:
        now = [os.stat(path)]
    except OSError:
        now = [None]
    if opened is not None:
        now.append(opened)
    if any(s is None or s.st_size != size or s.st_mtime_ns != mtime_ns for s in now):
        raise ModelLoadError(f"{display_name(path)} changed while it was being read (its size or modification time); "
                             "a trainer may still be writing it: load it again once it is complete")


def read_torch_mapped(path: Path, trust: bool) -> tuple[Any, os.stat_result | None]:
    """``native.read_torch_file(path, trust)`` and, when ``torch.load`` memory-mapped the file (a zip file that is not
    TorchScript), its stat from before it was opened: its tensors are then pages of the file until
    :func:`own_copies` copies them out."""
    before = os.stat(path)
    blob = native.read_torch_file(path, trust)
    return blob, (before if zipfile.is_zipfile(path) and not native.is_torchscript(path) else None)


def own_copies(state_dict: dict[str, Any], dtype: torch.dtype | None, path: Path,
               before: os.stat_result | None) -> None:
    """Replace, in place, every tensor of ``state_dict`` (memory-mapped from ``path`` by ``torch.load`` when
    ``before``, its stat before it was opened, is given) by a copy in the process's own memory, floating ones in
    ``dtype`` (None: as stored); then check the file did not change since ``before``. A file that was not mapped
    (``before`` None) is already in memory: only its floating tensors are converted.

    Why: a model whose parameters are pages of a mapped file dies of SIGBUS when a trainer truncates that file to save
    it again (``torch.save`` opens it with "wb") while a scan runs. Copied, only this copy touches the mapping."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            convert = dtype is not None and value.is_floating_point() and value.dtype != dtype
            if convert or before is not None:
                state_dict[key] = value.to(dtype) if convert else value.clone()
    if before is not None:
        check_unchanged(path, before.st_size, before.st_mtime_ns)


def resolve_precision(precision: str, float_elements: int, file_dtype: torch.dtype | None, what: str
                      ) -> tuple[torch.dtype, str | None]:
    """The dtype to hold the weights in, and a one-line note when ``auto`` chose a half precision.

    ``auto``: float32 when the float32 weights fit in the memory available, else the checkpoint's own half dtype
    (bfloat16 for a float32 file). A choice that cannot fit is refused before anything is read."""
    check_precision(precision)
    free = available_bytes(torch.device("cpu"))
    need32 = float_elements * 4
    note = None
    if precision == "auto":
        dtype = torch.float32
        if free is not None and need32 > free:
            dtype = file_dtype if file_dtype in HALF_DTYPES else torch.bfloat16
            note = (f"--precision auto: the float32 weights of {what} ({need32 / GIB:.1f} GiB) do not fit in the "
                    f"{free / GIB:.1f} GiB of memory available; holding them in {precision_name(dtype)}")
    else:
        dtype = PRECISION_DTYPES[precision]
    need = float_elements * dtype.itemsize
    if free is not None and need > free:
        smaller = (f"; {option('precision', 'bf16')} holds them in {need32 / 2 / GIB:.1f} GiB"
                   if dtype == torch.float32 and need32 / 2 <= free else "")
        raise ResourceError(f"{what} needs {need / GIB:.1f} GiB of memory for its weights in "
                            f"{precision_name(dtype)} and {free / GIB:.1f} GiB is available{smaller}")
    return dtype, note


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model with every parameter and buffer on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        return factory()


def meta_tensors(model: nn.Module) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def materialize_buffers(model: nn.Module) -> bool:
    """Compute the non-persistent buffers (RoPE frequencies, Eva's zero ``k_bias``, BEiT's relative position index)
    that a checkpoint does not hold, after a meta build. They get CPU storage first, because timm's
    ``init_non_persistent_buffers`` fills each buffer where it lies. False when some tensor is still on the meta
    device (a module that cannot recompute its buffers): the caller builds the model for real instead."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device="cpu")
    reinit_non_persistent_buffers(model)
    return not meta_tensors(model)


def finish_meta_build(model: nn.Module, rebuild: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor],
                      dtype: torch.dtype) -> nn.Module:
    """After the weights were assigned to a meta-built ``model``: its buffers computed (or, for a module that cannot
    recompute them, the model built for real and loaded the old way), and the whole held in ``dtype``."""
    if not materialize_buffers(model):
        model = rebuild()
        assign_weights(model, state_dict, dtype)
    hold_in(model, dtype)
    return model


def assign_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Load ``state_dict`` (keys and shapes already checked) into ``model``: on a meta-built model the tensors
    themselves become the parameters (no copy); floating tensors held in ``dtype``."""
    on_meta = any(p.is_meta for p in model.parameters())
    own = model.state_dict()
    converted = {k: (v.to(dtype) if v.is_floating_point() and own[k].is_floating_point() else v.to(own[k].dtype))
                 for k, v in state_dict.items()}
    model.load_state_dict(converted, assign=on_meta)
    if not on_meta and dtype != torch.float32:
        model.to(dtype)


def hold_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold ``model``'s floating parameters and buffers in ``dtype`` and make every forward run in it: the pixels
    are cast where they enter (the patch embedding), so every caller's float32 images work unchanged."""
    if dtype == torch.float32:
        return
    model.to(dtype)
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module):
        cast_inputs_to_weights(embed)


def model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or Inf, as ``"pos_embed (2 NaN, 0 Inf)"``."""
    found = []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not (t.is_floating_point() or t.is_complex()):
                continue
            if bool(torch.isfinite(t.sum())):  # one cheap pass: NaN and Inf reach the sum (10x faster than isfinite)
                continue
            n_bad = int((~torch.isfinite(t)).sum())  # exact, and rules out a sum that merely overflowed
            if n_bad:
                n_nan = int(torch.isnan(t).sum())
                found.append(f"{name} ({n_nan} NaN, {n_bad - n_nan} Inf)")
    return found


@dataclass
class CheckpointRead:
    """A checkpoint file's contents: ``blob`` (a state dict, a training checkpoint's dict or a pickled module), its
    own metadata, and for a safetensors file the dtype its weights were read into (chosen before reading)."""

    blob: Any
    meta: CheckpointMeta | None
    dtype: torch.dtype | None = None
    file_dtype: torch.dtype | None = None
    note: str | None = None
    path: Path | None = None
    mapped_stat: os.stat_result | None = None  # a torch file memory-mapped: its stat before it was opened

    def resolve_precision(self, state_dict: dict[str, torch.Tensor], precision: str, what: str) -> None:
        """``dtype`` and ``note`` for a torch file, whose size is known once it is mapped (nothing read yet): one
        that cannot fit is refused here. Then its weights are copied out of the mapping, in ``dtype``, in place."""
        self.file_dtype = self.file_dtype or state_dict_dtype(state_dict)
        if self.dtype is None:
            n_float = sum(t.numel() for t in state_dict.values() if t.is_floating_point())
            self.dtype, self.note = resolve_precision(precision, n_float, self.file_dtype, what)
        if self.mapped_stat is not None and self.path is not None:
            own_copies(state_dict, self.dtype, self.path, self.mapped_stat)
            self.mapped_stat = None


def read_checkpoint(path: Path, trust: bool, precision: str) -> CheckpointRead:
    """Read a checkpoint file; a safetensors file straight into the precision ``precision`` resolves to (its header
    says how large the weights are before any is read: one that cannot fit is refused first)."""
    if path.suffix == ".safetensors":
        header = read_safetensors_header(path)
        raw = header.metadata.get(META_KEY)
        try:
            meta = parse_meta_json(raw) if raw else None
        except CheckpointMetadataError as exc:
            raise CheckpointMetadataError(exc.field, exc.why, path.name) from None
        file_dtype = header.dominant_float_dtype()
        dtype, note = resolve_precision(precision, header.float_elements(), file_dtype, display_name(path.name))
        return CheckpointRead(read_safetensors(header, dtype), meta, dtype, file_dtype, note)
    blob, mapped = read_torch_mapped(path, trust)
    raw_meta = blob.get(META_KEY) if isinstance(blob, dict) else None
    if isinstance(raw_meta, dict):
        blob = {k: v for k, v in blob.items() if k != META_KEY}
        try:
            return CheckpointRead(blob, CheckpointMeta.from_dict(raw_meta), path=path, mapped_stat=mapped)
        except CheckpointMetadataError as exc:
            raise CheckpointMetadataError(exc.field, exc.why, path.name) from None
    return CheckpointRead(blob, None, path=path, mapped_stat=mapped)


def state_dict_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most of a state dict's elements."""
    totals: dict[torch.dtype, int] = {}
    for t in state_dict.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel()
    return max(totals, key=totals.__getitem__) if totals else None


def state_dict_in(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``model``'s state dict with its floating tensors in ``dtype`` (None: as held)."""
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in model.state_dict().items()}
