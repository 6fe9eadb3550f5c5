"""Which transformer blocks a measurement reads: the one parser behind every ``--blocks`` (and ``blocks=``).

A spec is ``all``, one index (``3``), a comma list (``3,5,7``) or an inclusive range ``A:B`` (``2:8`` = blocks 2 to
8; either end may be left out: ``:8`` = 0 to 8, ``9:`` = 9 to the last), or a mix (``0,4:6,-1``). Indices are 0-based
like timm's, and a negative index counts from the end (``-1`` = the last block): that rule lives here and nowhere
else. Ranges are inclusive because a range of blocks is read as "blocks 2 to 8"; a Python slice would leave out 8.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from artifactscan.core.errors import InputError, option

#: The spec that selects every block.
ALL_BLOCKS = "all"

BlockSpec = str | int | Sequence[int] | None


def valid_range(num_blocks: int) -> str:
    """How to name a block of a model with ``num_blocks`` blocks, for error messages."""
    return (f"this model has {num_blocks} blocks: valid are 0..{num_blocks - 1} (or -{num_blocks}..-1 from the end, "
            f"-1 = the last), one index, a comma list or an inclusive range such as 0:{num_blocks - 1}")


def _index(text: str, spec: Any, parameter: str, num_blocks: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{option(parameter, repr(spec))}: {text!r} is not a block index "
                         f"({valid_range(num_blocks)})") from None


def _check(index: int, spec: Any, parameter: str, num_blocks: int, hint: str) -> int:
    if not -num_blocks <= index < num_blocks:
        shown = (f"{option(parameter, repr(spec))}: block {index}"
                 if isinstance(spec, str) and spec.strip() != str(index) else option(parameter, index))
        raise InputError(f"{shown} is out of range: {valid_range(num_blocks)}{hint}")
    return index % num_blocks


def _expand(part: str, spec: Any, parameter: str, num_blocks: int, hint: str) -> list[int]:
    if ":" not in part:
        return [_check(_index(part, spec, parameter, num_blocks), spec, parameter, num_blocks, hint)]
    start_text, _, stop_text = part.partition(":")
    start = _check(_index(start_text.strip(), spec, parameter, num_blocks), spec, parameter, num_blocks, hint) \
        if start_text.strip() else 0
    stop = _check(_index(stop_text.strip(), spec, parameter, num_blocks), spec, parameter, num_blocks, hint) \
        if stop_text.strip() else num_blocks - 1
    if stop < start:
        raise InputError(f"{option(parameter, repr(spec))}: the range {part} ends before it starts (blocks {start} "
                         f"to {stop}); "
                         "write the lower block first")
    return list(range(start, stop + 1))


def parse_blocks(spec: BlockSpec, num_blocks: int, hint: str = "", parameter: str = "blocks") -> list[int]:
    """Sorted, de-duplicated 0-based block indices for ``spec`` (None or ``"all"``: every block).

    ``spec`` is a string (module docstring), an int, or a sequence of ints. A bad or out-of-range spec is an
    :class:`InputError` naming ``parameter`` (as the caller spells it: :func:`~artifactscan.core.errors.option`) and the valid range, followed by ``hint`` (e.g.
    :meth:`LoadedModel.layer_range_hint`, the onset a phantom records).
    """
    if num_blocks < 1:
        raise InputError("the model has no transformer blocks to choose from")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", ALL_BLOCKS)):
        return list(range(num_blocks))
    if isinstance(spec, bool):
        raise InputError(f"{option(parameter, repr(spec))} is not a block index ({valid_range(num_blocks)})")
    if isinstance(spec, int):
        return [_check(spec, spec, parameter, num_blocks, hint)]
    if isinstance(spec, str):
        blocks = [b for part in spec.split(",") for b in _expand(part.strip(), spec, parameter, num_blocks, hint)]
    else:
        blocks = [_check(int(b), int(b), parameter, num_blocks, hint) for b in spec]
    if not blocks:
        raise InputError(f"{option(parameter)} is empty; {valid_range(num_blocks)}")
    return sorted(set(blocks))


def parse_block(spec: BlockSpec, num_blocks: int, hint: str = "", parameter: str = "blocks",
                default: int = -1) -> int:
    """One block, for the measurements that read a single block (probe, discover): ``parse_blocks`` that refuses a
    list or a range of several blocks with one line. None -> ``default``."""
    if spec is None:
        spec = default
    if isinstance(spec, str) and spec.strip().lower() == ALL_BLOCKS:
        raise InputError(f"{option(parameter, 'all')}: this measurement reads one block; name one, e.g. "
                         f"{option(parameter, -1)} (the last)")
    blocks = parse_blocks(spec, num_blocks, hint, parameter)
    if len(blocks) != 1:
        raise InputError(f"{option(parameter, spec if isinstance(spec, str) else list(blocks))}: this measurement reads one "
                         f"block, not {len(blocks)}; name one, e.g. {option(parameter, -1)} (the last)")
    return blocks[0]


def as_written(spec: BlockSpec, resolved: int) -> int:
    """A single block as the user wrote it, for a report that keeps both (``-1`` stays -1 beside its resolved
    index); a spec that is not one plain integer (``3:3``) is reported as ``resolved``."""
    try:
        return int(str(spec).strip())
    except ValueError:
        return resolved


def parse_blocks_up_to(spec: BlockSpec, num_blocks: int, hint: str = "", parameter: str = "blocks") -> int | None:
    """The last block of a search that always starts at block 0 (``fix``'s register neurons): ``spec`` must name
    blocks 0 to N (``0:N`` or ``:N``; ``0`` alone is block 0). Returns N; None -> None (the caller's default)."""
    if spec is None:
        return None
    blocks = parse_blocks(spec, num_blocks, hint, parameter)
    if blocks != list(range(blocks[-1] + 1)):
        raise InputError(f"{option(parameter, repr(spec))}: this search reads every block from 0 up to the last one "
                         f"named; write {option(parameter, f'0:{blocks[-1]}')} (blocks 0 to {blocks[-1]})")
    return blocks[-1]


def renamed_keyword(new_value: Any, old_value: Any, new: str, old: str, default: Any = None,
                    stacklevel: int = 3) -> Any:
    """The value of a library keyword renamed from ``old`` to ``new``: the old one still works for one version,
    with a DeprecationWarning; both given (the new one away from its ``default``) is an error. ``old_value`` None:
    not given."""
    if old_value is None:
        return new_value
    warnings.warn(f"the keyword {old}= is deprecated; use {new}= (same meaning)", DeprecationWarning,
                  stacklevel=stacklevel)
    if new_value is not None and new_value != default:
        raise InputError(f"{old}= and {new}= name the same thing; pass only {new}=")
    return old_value
