"""``probe()``: do the flagged high-norm tokens behave like the paper's artifacts, or like content?

Darcet et al. (2024) show that artifact tokens (Sec. 2.2) sit on *redundant* patches (Fig. 5a), have *lost their
local information* (position and pixels, Fig. 5b) and *hold global information* (Table 1). A norm rule alone also
flags content tokens (saturated object patches reach 5-7x the median norm in small trained ViTs), so this module
measures those signatures at one layer and calls the flagged tokens artifact-like, content-like or inconclusive.
The exact protocol is :data:`PROTOCOL` (also in ``artifactscan probe --help``, docs/probe-protocol.md and every report).

Streaming and memory: the model runs once over the data, only up to the probed block (early exit). Tokens go into
bounded, stratified reservoirs (per split x log-norm band, with a per-image cap); the class of a token (normal /
outlier) is decided at the end, from the same exact histogram and threshold rule as ``artifactscan norms``, and each
class is then re-sampled in proportion to the exact band counts, so it is a uniform sample of that class. Memory does
not grow with the number of images. Every random choice is keyed by (seed, image index, token index), so under
``torchrun`` each rank probes its shard of the images and the merged histograms and samples -- hence the report -- are
those of a single process. Probes are closed-form ridge fits (torch, on the GPU when present) with the
penalty chosen on a held-out part of the training images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from artifactscan.core.blocks import as_written, parse_block, renamed_keyword
from artifactscan.core.defaults import BATCH_SIZE, BLOCK, DEVICE, THRESHOLD, WORKERS
from artifactscan.core.errors import InputError, option
from artifactscan.inputs.images import image_folder_labels
from artifactscan.analysis.passes import OpenedPass, PassSettings, open_pass
from artifactscan.models.loading import LoadedModel
from artifactscan.core.stats import BIN_WIDTH_LOG10
from artifactscan.core.thresholds import AutoRule, auto_threshold, fixed_threshold, threshold_option
from artifactscan.analysis.probes.types import (
    BAND_BINS,
    DEFAULT_PROBE_IMAGES,
    GLOBAL_DRAWS,
    LabelInfo,
    MAX_GLOBAL_IMAGES,
    MAX_TEST_TOKENS,
    MAX_TRAIN_TOKENS,
    MIN_GLOBAL_IMAGES,
    MIN_IMAGES,
    MIN_LOCAL_TOKENS,
    NeighbourHistogram,
    PROTOCOL,
    ProbeReport,
    RIDGE_GRID,
    SIM_BINS,
    TEST_FRACTION,
    TOKENS_PER_IMAGE,
    TokenTypeRow,
)
from artifactscan.analysis.probes.sampling import (
    ImageStore,
    STREAM_DRAW_SPLIT,
    STREAM_DRAW_TOKEN,
    STREAM_MATCHED,
    canonical_order,
    hash_keys,
    class_sample,
    collect_tokens,
)
from artifactscan.analysis.probes.ridge import fit_ridge
from artifactscan.analysis.probes.verdict import decide_verdict
from artifactscan.inputs.synthetic import SyntheticShapes

# ----------------------------------------------------------------------------------------------- result types
# ----------------------------------------------------------------------------------------------- early exit
#: Per-image candidates for the global probe: a uniform reservoir of at most ``cap`` images.
# ----------------------------------------------------------------------------------------------- ridge
# ----------------------------------------------------------------------------------------------- probes


def _local_metrics(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], grid: tuple[int, int],
                   device: torch.device, seed: int) -> dict[str, float]:
    gh, gw = grid
    pos_fit = fit_ridge(train["feat"], train["pos"], train["img"], classify=True, device=device, seed=seed)
    scores = pos_fit.predict(test["feat"])
    n_cls = scores.shape[1]
    pred = scores.argmax(1).cpu()
    true = test["pos"]
    top1 = float((pred == true).double().mean())
    majority = int(torch.bincount(train["pos"], minlength=n_cls).argmax())
    chance = float((true == majority).double().mean())
    dist = torch.sqrt(((pred // gw - true // gw) ** 2 + (pred % gw - true % gw) ** 2).double()).mean()
    rec_fit = fit_ridge(train["feat"], train["pix"], train["img"], device=device, seed=seed)
    rec = rec_fit.predict(test["feat"]).cpu()
    target = test["pix"].to(rec.dtype)
    err = ((rec - target) ** 2).sum(1)
    base = ((target - train["pix"].to(rec.dtype).mean(0)) ** 2).sum(1)
    return {"position_top1": top1, "position_chance": chance, "position_distance": float(dist),
            "reconstruction_l2": float(err.mean() / target.shape[1]),
            "reconstruction_fvu": float(err.sum() / base.sum().clamp_min(1e-12))}


def _median_from_hist(counts: torch.Tensor, edges: torch.Tensor) -> float | None:
    total = int(counts.sum())
    if total == 0:
        return None
    c = torch.cumsum(counts, 0).double()
    i = int(torch.searchsorted(c, torch.tensor([total / 2], dtype=torch.float64)).clamp(max=len(counts) - 1))
    prev = float(c[i - 1]) if i else 0.0
    frac = (total / 2 - prev) / max(float(counts[i]), 1.0)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def _global_probe(store: ImageStore, kind: str, is_out: Callable[[torch.Tensor], torch.Tensor] | None,
                  draws: int, test_fraction: float, device: torch.device, seed: int, min_images: int = 0
                  ) -> tuple[int, list[float], float | None]:
    """Top-1 per draw of a linear classifier on one token per image (``kind``: normal/outlier/cls/registers)."""
    rec = store.parts
    assert rec is not None
    accs: list[float] = []
    chance = []
    n_avail = 0
    for d in range(draws):
        if kind in ("cls", "registers"):
            feats = rec["cls" if kind == "cls" else "reg"]
            ok = torch.ones(len(feats), dtype=torch.bool)
        else:
            cand, lv = (rec["rand"], rec["rand_level"]) if kind == "normal" else (rec["top"], rec["top_level"])
            valid = ~is_out(lv) if kind == "normal" else is_out(lv)  # type: ignore[misc]
            ok = valid.any(1)
            # a uniformly random valid candidate per image: random keys, invalid ones pushed to +inf
            keys = hash_keys(seed * 1000 + d, STREAM_DRAW_TOKEN, rec["img"][:, None],
                              torch.arange(valid.shape[1])[None, :]).masked_fill(~valid, float("inf"))
            pick = keys.argmin(1)
            feats = cand[torch.arange(len(cand)), pick]
        labels = rec["label"]
        idx = torch.nonzero(ok).flatten()
        n_avail = len(idx)
        if n_avail < max(4, min_images) or len(torch.unique(labels[idx])) < 2:
            return n_avail, [], None
        split_key = hash_keys(seed * 1000 + d, STREAM_DRAW_SPLIT, rec["img"][idx])
        perm = idx[torch.argsort(split_key, stable=True)]  # a random image order that depends only on the indices
        n_test = max(1, round(test_fraction * len(perm)))
        te, tr = perm[:n_test], perm[n_test:]
        # relabel classes to 0..C-1 on the train set
        classes, y_tr = torch.unique(labels[tr], return_inverse=True)
        fit = fit_ridge(feats[tr], y_tr, rec["img"][tr], classify=True, device=device, seed=seed + d)
        pred = classes[fit.predict(feats[te]).argmax(1).cpu()]
        accs.append(float((pred == labels[te]).double().mean()))
        majority = classes[torch.bincount(y_tr).argmax()]
        chance.append(float((labels[te] == majority).double().mean()))
    return n_avail, accs, float(sum(chance) / len(chance)) if chance else None


# ----------------------------------------------------------------------------------------------- labels
def _resolve_labels(images: Any, source: Any, labels: Sequence[int] | None) -> tuple[torch.Tensor | None, LabelInfo]:
    n = source.num_found
    if labels is not None:
        if len(labels) != n:
            raise InputError(f"labels has {len(labels)} entries for {n} images")
        lab = torch.as_tensor(list(labels), dtype=torch.long)
        return lab, LabelInfo("given", int(len(torch.unique(lab))), [], True, "")
    inner = getattr(source.dataset, "source", None)

    if isinstance(inner, SyntheticShapes):
        lab = torch.tensor([inner.label(i) for i in range(n)], dtype=torch.long)
        return lab, LabelInfo("synthetic", int(len(torch.unique(lab))), list(inner.classes), True, "")
    if isinstance(inner, Dataset) and hasattr(inner, "targets"):
        lab = torch.as_tensor(list(inner.targets), dtype=torch.long)  # type: ignore[attr-defined]
        return lab, LabelInfo("dataset.targets", int(len(torch.unique(lab))), [], True, "")
    if isinstance(images, (str, Path)) and Path(images).expanduser().is_dir():
        ids, names = image_folder_labels(images, source.names)
        if ids is None:
            return None, LabelInfo("none", 0, [], False,
                                   "global probe skipped: the images are not in class sub-folders (ImageFolder layout "
                                   "root/<class>/img.jpg), so there are no labels; local probes ran")
        return torch.tensor(ids, dtype=torch.long), LabelInfo("folders", len(names or []), list(names or []), True, "")
    return None, LabelInfo("none", 0, [], False,
                           "global probe skipped: these images carry no class labels (use an ImageFolder layout or "
                           "pass labels=); local probes ran")


# ----------------------------------------------------------------------------------------------- steps of probe()
def _check_probe_options(batch_size: int, draws: int, min_tokens: int, min_images: int, max_train_tokens: int,
                         max_test_tokens: int, max_global_images: int, test_fraction: float) -> None:
    for name, value in ((option("batch_size"), batch_size), (option("draws"), draws),
                        (option("min_tokens"), min_tokens), (option("min_images"), min_images),
                        ("max_train_tokens", max_train_tokens),
                        ("max_test_tokens", max_test_tokens), ("max_global_images", max_global_images)):
        if value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    if not 0 < test_fraction < 1:
        raise InputError(f"{option('test_fraction')} must be between 0 and 1, got {test_fraction}")


def _test_split(n: int, test_fraction: float, seed: int) -> torch.Tensor:
    """Which images are held out for testing (``True``), drawn from ``seed``; refuses too few to split."""
    too_few = InputError(f"probe needs at least {MIN_IMAGES} images to split them into train and held-out test "
                         f"images; got {n}")
    if n < MIN_IMAGES:
        raise too_few
    gen = torch.Generator().manual_seed(seed)
    n_test = max(1, round(test_fraction * n))
    if n - n_test < 3:
        raise too_few
    test_mask = torch.zeros(n, dtype=torch.bool)
    test_mask[torch.randperm(n, generator=gen)[:n_test]] = True
    return test_mask


def _labels(data: Any, source: Any, labels: Sequence[int] | None) -> tuple[torch.Tensor | None, LabelInfo]:
    """The images' class labels for the global probe, or ``None`` (with the reason in the label info)."""
    lab, label_info = _resolve_labels(data, source, labels)
    if lab is not None and label_info.num_classes < 2:
        lab = None
        label_info.global_probe = False
        label_info.message = ("global probe skipped: all images have the same class label (one class); "
                              "local probes ran")
    return lab, label_info


@dataclass
class _Classes:
    """The threshold's decision on the probed layer and what it makes of the tokens: ``is_out(levels)``."""

    decision: Any
    edge: int | None
    big: int
    num_tokens: int
    num_outliers: int
    images_with_outliers: int
    out_levels: torch.Tensor

    def is_out(self, levels: torch.Tensor) -> torch.Tensor:
        return levels >= (self.edge if self.edge is not None else self.big)


def _classes(col: Any, fixed: float | None, rule: AutoRule) -> _Classes:
    """The same threshold rule as ``norms``, on the exact histogram of the probed layer."""
    all_counts = col.counts.sum(0)
    if fixed is not None:
        decision = fixed_threshold(fixed)
        edge: int | None = 1
    else:
        decision = auto_threshold(all_counts, rule)
        edge = decision.edge_index if decision.value is not None else None
    cls = _Classes(decision, edge, col.capped.shape[1] + 1, int(all_counts.sum()), 0, 0, torch.empty(0))
    cls.out_levels = cls.is_out(torch.arange(col.counts.shape[1]))
    cls.num_outliers = int(all_counts[cls.out_levels].sum())
    cls.images_with_outliers = int(col.image_max_counts[cls.out_levels].sum())
    return cls


def _local_samples(col: Any, cls: _Classes, seed: int, max_train_tokens: int, max_test_tokens: int
                   ) -> tuple[dict[str, TokenTypeRow], dict[str, Any]]:
    """The rows of the local probes and their (train, test) samples, with the n-matched control when there are
    outliers: the normal probe fitted on as many train tokens as the outlier probe gets."""
    samples = {cname: (class_sample(col, 0, cls.is_out, is_o, max_train_tokens),
                       class_sample(col, 1, cls.is_out, is_o, max_test_tokens))
               for cname, is_o in (("normal", False), ("outlier", True))}
    n_norm_tokens = cls.num_tokens - cls.num_outliers
    totals = {"normal": n_norm_tokens, "outlier": cls.num_outliers}
    if cls.num_outliers > 0:
        tr_n, te_n = samples["normal"]
        tr_o = samples["outlier"][0]
        if tr_n is not None and tr_o is not None and len(tr_o["key"]) < len(tr_n["key"]):
            mkey = hash_keys(seed, STREAM_MATCHED, tr_n["img"], tr_n["pos"])
            keep = canonical_order({"key": mkey, "img": tr_n["img"], "pos": tr_n["pos"]})[: len(tr_o["key"])]
            samples["normal (n-matched)"] = ({k2: v[keep] for k2, v in tr_n.items()}, te_n)
        else:
            samples["normal (n-matched)"] = samples["normal"]
        totals = {"normal": n_norm_tokens, "normal (n-matched)": n_norm_tokens, "outlier": cls.num_outliers}
    rows: dict[str, TokenTypeRow] = {}
    for cname, total in totals.items():
        tr, te = samples[cname]
        row = TokenTypeRow(cname, tokens_total=total)
        row.local_train_tokens = 0 if tr is None else len(tr["key"])
        row.local_test_tokens = 0 if te is None else len(te["key"])
        rows[cname] = row
    return rows, samples


def _run_local_probes(rows: dict[str, TokenTypeRow], samples: dict[str, Any], grid: tuple[int, int],
                      dev: torch.device, seed: int, min_tokens: int) -> None:
    for name, row in rows.items():
        tr, te = samples[name]
        if row.tokens_total == 0:
            row.local_status = "none"
            continue
        n_tr, n_te = row.local_train_tokens, row.local_test_tokens
        if n_te < min_tokens or n_tr < min_tokens:
            row.local_status = f"too few (n={min(n_tr, n_te)})"
            continue
        if len(torch.unique(tr["img"])) < 2:
            row.local_status = f"too few (n={n_tr} tokens from 1 image)"
            continue
        for key_name, value in _local_metrics(tr, te, grid, dev, seed).items():
            setattr(row, key_name, value)
        row.local_status = "ok"


def _neighbour_rows(col: Any, cls: _Classes, rows: dict[str, TokenTypeRow], min_tokens: int) -> NeighbourHistogram:
    """Neighbour similarity of normal and outlier tokens (exact histograms), into their rows."""
    edges = torch.linspace(-1, 1, SIM_BINS + 1, dtype=torch.float64)
    h_norm = col.sim_hist[~cls.out_levels].sum(0)
    h_out = col.sim_hist[cls.out_levels].sum(0)
    neighbours = NeighbourHistogram([float(e) for e in edges], h_norm.tolist(), h_out.tolist(),
                                    _median_from_hist(h_norm, edges), _median_from_hist(h_out, edges), col.has_pe)
    rows["normal"].neighbour_tokens = int(h_norm.sum())
    rows["normal"].neighbour_similarity_median = neighbours.normal_median
    if "outlier" in rows:
        rows["outlier"].neighbour_tokens = int(h_out.sum())
        rows["outlier"].neighbour_similarity_median = neighbours.outlier_median if col.has_pe else None
    if cls.num_outliers and int(h_out.sum()) < min_tokens:
        rows["outlier"].neighbour_similarity_median = None
    return neighbours


def _run_global_probes(rows: dict[str, TokenTypeRow], col: Any, cls: _Classes, label_info: LabelInfo, draws: int,
                       test_fraction: float, dev: torch.device, seed: int, min_images: int) -> None:
    for name, row in rows.items():
        if name == "normal (n-matched)":
            row.global_status = "n/a"
            continue
        if col.images is None or col.images.parts is None:
            row.global_status = "skipped (no labels)" if not label_info.global_probe else "skipped"
            continue
        if name == "outlier" and cls.num_outliers == 0:
            row.global_status = "none"
            continue
        n_avail, accs, chance = _global_probe(col.images, name, cls.is_out, draws, test_fraction, dev, seed,
                                              min_images)
        row.global_images = n_avail
        if n_avail < min_images or not accs:
            row.global_status = f"too few (n={n_avail})" if n_avail < min_images else "skipped (one class)"
            continue
        acc = torch.tensor(accs, dtype=torch.float64)
        row.global_top1 = float(acc.mean())
        row.global_top1_std = float(acc.std()) if len(accs) > 1 else 0.0
        row.global_chance = chance
        row.global_status = "ok"


# ----------------------------------------------------------------------------------------------- probe()
def probe(
    model: str | Path | LoadedModel | torch.nn.Module | None = None,
    data: str | Path | Dataset | torch.Tensor | None = None,
    *,
    blocks: int | str | None = BLOCK,
    threshold: str | float | None = THRESHOLD,
    labels: Sequence[int] | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    weights: str | None = None,
    precision: str = "auto",
    device: str | None = DEVICE,
    batch_size: int = BATCH_SIZE,
    num_workers: int | str = WORKERS,
    exact_decode: bool = False,
    gpu_decode: bool = False,
    min_tokens: int = MIN_LOCAL_TOKENS,
    min_images: int = MIN_GLOBAL_IMAGES,
    draws: int = GLOBAL_DRAWS,
    test_fraction: float = TEST_FRACTION,
    max_train_tokens: int = MAX_TRAIN_TOKENS,
    max_test_tokens: int = MAX_TEST_TOKENS,
    max_global_images: int = MAX_GLOBAL_IMAGES,
    seed: int = 0,
    rule: AutoRule | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    allow_nonfinite: bool = False,
    layer: int | None = None,
) -> ProbeReport:
    """Run the paper's probes (position, reconstruction, global, neighbour similarity) at one layer.

    Args:
        model: anything :func:`artifactscan.load_model` accepts (``None``: the embedded default).
        data: an image folder (labels from class sub-folders when present), ``"synthetic:N"``, a Dataset of
            ``[0, 1]`` tensors (labels from ``.targets`` / ``.label(i)``) or an ``[N, 3, H, W]`` tensor (pass
            ``labels``). ``None``: ``synthetic:2000``, the built-in labelled set.
        blocks: the one block probed, 0-based; negative counts from the end (-1 = last block), as
            :func:`artifactscan.core.blocks.parse_block` reads it. Only blocks ``0..blocks`` run. (``layer=``: its
            old name, deprecated.)
        threshold: ``"auto"`` or a number, exactly as ``artifactscan norms``.
        min_tokens / min_images: below these, a row says "too few (n=...)" instead of a number.
        draws: random draws of the global probe. seed: makes every random choice repeatable.
        allow_nonfinite: load a model with NaN/Inf weights instead of refusing it (e.g. NaN only in blocks after
            ``layer``, which never run); the probed block's tokens must still be finite (:class:`NonFiniteError`).

    Returns:
        A :class:`ProbeReport` (``.verdict.label``: artifact-like / content-like / inconclusive / clean).

    Raises:
        InputError for a layer out of range, too few images for the split, bad thresholds or options.
    """
    fixed = threshold_option(threshold)
    _check_probe_options(batch_size, draws, min_tokens, min_images, max_train_tokens, max_test_tokens,
                         max_global_images, test_fraction)
    settings = PassSettings(device=device, batch_size=batch_size, num_workers=num_workers, exact_decode=exact_decode,
                            gpu_decode=gpu_decode, progress=progress, warn=warn, allow_nonfinite=allow_nonfinite)
    rule = rule or AutoRule()
    load = dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, img_size=img_size,
                weights=weights, precision=precision)

    requested = renamed_keyword(blocks, layer, "blocks", "layer", BLOCK)

    def block_of(loaded: LoadedModel) -> int:  # a block out of range is said before anything about the images
        return parse_block(requested, len(loaded.blocks), loaded.layer_range_hint())

    data = f"synthetic:{DEFAULT_PROBE_IMAGES}" if data is None else data
    with open_pass(model, data, settings=settings, load=load, after_load=block_of) as opened:
        k, n = block_of(opened.loaded), opened.source.num_found
        test_mask = _test_split(n, test_fraction, seed)
        lab, label_info = _labels(data, opened.source, labels)
        col = collect_tokens(opened, k, fixed, test_mask, lab, seed, max_global_images)
    opened.announce_skipped(col.skipped)
    if col.num_images < MIN_IMAGES:
        raise InputError(f"only {col.num_images} of {n} images could be read; probe needs at least {MIN_IMAGES}")
    cls = _classes(col, fixed, rule)
    rows, samples = _local_samples(col, cls, seed, max_train_tokens, max_test_tokens)
    _run_local_probes(rows, samples, opened.loaded.grid_size, opened.device, seed, min_tokens)
    neighbours = _neighbour_rows(col, cls, rows, min_tokens)
    loaded = opened.loaded
    if loaded.num_cls_tokens:
        rows["cls"] = TokenTypeRow("cls")
    if loaded.num_register_tokens:
        rows["registers"] = TokenTypeRow("registers")
    _run_global_probes(rows, col, cls, label_info, draws, test_fraction, opened.device, seed, min_images)
    verdict = decide_verdict(rows, cls.num_outliers, min_tokens, k, neighbours,
                             undecided=cls.decision.reason if cls.decision.inconclusive else None)
    settings_used = {"seed": seed, "test_fraction": test_fraction, "draws": draws, "min_tokens": min_tokens,
                     "min_images": min_images, "max_train_tokens": max_train_tokens,
                     "max_test_tokens": max_test_tokens, "max_global_images": max_global_images}
    return _probe_report(opened, col, cls, k, requested, rows, neighbours, label_info, verdict, fixed, settings_used)


def _probe_report(opened: OpenedPass, col: Any, cls: _Classes, k: int, requested: Any, rows: dict[str, TokenTypeRow],
                  neighbours: NeighbourHistogram, label_info: LabelInfo, verdict: Any, fixed: float | None,
                  settings: dict[str, Any]) -> ProbeReport:
    loaded, source = opened.loaded, opened.source
    num_blocks = len(loaded.blocks)
    notes = list(loaded.notes)
    if label_info.message:
        notes.append(label_info.message)
    if not col.has_pe:
        notes.append("neighbour similarity unavailable: the patch embedding output is not one token per patch")
    n_tokens, n_out = cls.num_tokens, cls.num_outliers
    return ProbeReport(
        model=loaded.summary(), images=source.summary(col.num_images, col.skipped), headline=verdict.summary,
        layer=k, layer_requested=as_written(requested, k), num_blocks=num_blocks,
        layer_description=(f"residual-stream output of block {k} (0-based; {k + 1} of {num_blocks} blocks run), "
                           "before the final norm"),
        threshold_mode="fixed" if fixed is not None else "auto", threshold=cls.decision.value,
        threshold_reason=cls.decision.reason, num_patch_tokens=n_tokens, num_outliers=n_out,
        outlier_fraction=n_out / n_tokens if n_tokens else 0.0, images_with_outliers=cls.images_with_outliers,
        rows=list(rows.values()), neighbours=neighbours, labels=label_info, verdict=verdict,
        settings={**settings, "tokens_per_image_per_band": TOKENS_PER_IMAGE,
                  "band_width_log10": BAND_BINS * BIN_WIDTH_LOG10, "ridge_grid": list(RIDGE_GRID),
                  "device": str(opened.device)},
        protocol=PROTOCOL, notes=notes)


# ----------------------------------------------------------------------------------------------- output
