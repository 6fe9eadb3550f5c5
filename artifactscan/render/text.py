"""Terminal rendering: the rich tables and panels the CLI prints for scan, compare, emergence and probe results."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

from rich.markup import escape

from artifactscan.analysis.probes.types import ProbeReport
from artifactscan.analysis.scan import ScanReport

NOT_AN_ARTIFACT_HINT = (
    "A high norm alone does not prove an artifact: content tokens (e.g. saturated object patches) can be large too. "
    "Run `artifactscan probe` to test the paper's other signatures."
)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


NEAR_MISS_MIN_RATIO = 1.5  # the terminal lists rejected groups from 1.5x the bulk; report.json keeps every layer's


def near_misses(report: ScanReport, min_ratio: float = NEAR_MISS_MIN_RATIO) -> list[str]:
    """One line per layer without outliers whose strongest candidate group (``bimodality["rejected"]``) stands at
    least ``min_ratio`` x above the bulk: the groups a user may want to look at ("a 1.8x group of 0.4% of tokens,
    rejected: ratio 1.8x < 2.5x"). Smaller candidates (a split inside the bulk) stay in the JSON only."""
    out = []
    for lay in report.layers:
        d = lay.bimodality or {}
        if lay.threshold is None and d.get("rejected") and d.get("ratio", 0) >= min_ratio:
            out.append(f"{lay.name}: a {d['ratio']:.1f}x group of {_pct(d['group_share'])} of tokens "
                       f"({d['group_tokens']}) above a {d['gap']:.2f}x gap - rejected: {'; '.join(d['rejected'])}")
    return out


def render_calibration(report: Any, console: "Console") -> None:
    """The detection-limit table of ``artifactscan calibrate`` and its headline."""
    from rich.panel import Panel
    from rich.table import Table

    table = Table(title=f"Detection limit: phantoms built from {report.base}, onset block {report.onset} of "
                        f"{report.num_blocks}, scanned on {report.images}", title_justify="left", header_style="bold")
    for col in ("gain", "planted", "ratio (weakest block)", "ratio (onset)", "precision", "recall", "onset error",
                "blocks found"):
        table.add_column(col, justify="right")
    for c in report.cells:
        found = c.recall >= 0.95 and c.precision >= 0.95 and c.onset_error == 0
        table.add_row(f"{c.gain:g}x", f"{c.planted_per_image}/image ({_pct(c.planted_share)})", f"{c.ratio:.2f}x",
                      f"{c.ratio_at_onset:.2f}x", "-" if c.precision != c.precision else f"{c.precision:.2f}",
                      f"{c.recall:.2f}",
                      "-" if c.onset_error is None else f"{c.onset_error:+d}",
                      f"{c.blocks_detected}/{c.blocks_planted}", style="" if found else "red")
    console.print(table)
    console.print(Panel(report.headline, title="detection limit (calibration phantoms)", style="bold"))
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/dim]", highlight=False)


def render_scan(report: ScanReport, console: "Console") -> None:
    """The per-layer table and the headline, for humans."""
    from rich.panel import Panel
    from rich.table import Table

    m = report.model
    prefix = f"{m.num_cls_tokens} CLS + {m.num_register_tokens} register" if m.num_prefix_tokens else "no prefix"
    title = (f"{m.name} ({m.arch or m.source}) - {m.num_blocks} blocks, {prefix} tokens, "
             f"{m.grid_size[0]}x{m.grid_size[1]} patches - {report.images.num_scanned} images")
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    for col, justify in (("layer", "left"), ("median", "right"), ("p99", "right"), ("max", "right"),
                         ("max/med", "right"), ("threshold", "right"), ("% flagged", "right"),
                         ("images", "right"), ("> 150", "right"), ("prefix norms (mean)", "left")):
        table.add_column(col, justify=justify)
    for lay in report.layers:
        flagged = lay.num_outliers > 0
        style = "bold red" if flagged else ("dim" if lay.is_final_norm else "")
        prefix_text = " ".join(f"{p.name}={p.mean:.3g}" for p in lay.prefix[:5])
        if len(lay.prefix) > 5:
            prefix_text += f" (+{len(lay.prefix) - 5})"
        table.add_row(
            lay.name, f"{lay.median:.3g}", f"{lay.p99:.3g}", f"{lay.max:.3g}", f"{lay.max_over_median:.1f}x",
            "-" if lay.threshold is None else f"{lay.threshold:.3g}", _pct(lay.outlier_fraction),
            f"{lay.images_with_outliers}/{report.images.num_scanned}", _pct(lay.fraction_above_150),
            prefix_text or "-", style=style)
    console.print(table)
    near = near_misses(report)
    if near:
        console.print("[dim]Near misses (a candidate group the rule rejected, and why):[/dim]", highlight=False)
        for line in near:
            console.print(f"[dim]  {escape(line)}[/dim]", highlight=False, soft_wrap=True)
    if report.model.kind == "phantom":
        console.print(Panel(report.model.calibration_note or "", title="calibration phantom", style="yellow"))
    console.print(Panel(report.headline, title="verdict", style="bold"))
    for note in report.notes:  # how the model was loaded: converted layout, inferred architecture, EMA or raw
        if note != report.model.calibration_note:
            console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if report.onset_layer is not None:
        console.print(f"[dim]{NOT_AN_ARTIFACT_HINT}[/dim]")
    console.print(f"[dim]Threshold rule - {report.threshold_rule}[/dim]")


def render_compare(report: Any, console: "Console") -> None:
    """One row per model: the comparison table and the verdict."""
    from artifactscan.analysis.compare import count_models
    from rich.panel import Panel
    from rich.table import Table

    table = Table(title=escape(f"{count_models(len(report.rows))} on {report.images}"), title_justify="left",
                  header_style="bold")
    for col in ("model", "registers", "onset", "% flagged (last)", "images", "max/med", "peak % flagged",
                "attn on prefix", "register norm", "flagged on background"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in report.rows:
        att = " ".join(f"{k}={100 * v:.1f}%" for k, v in r.prefix_attention.items()) or "-"
        table.add_row(escape(r.label), str(r.registers), "-" if r.onset_layer is None else str(r.onset_layer),
                      _pct(r.outlier_fraction), _pct(r.image_fraction_with_outliers), f"{r.max_over_median:.1f}x",
                      _pct(r.peak_outlier_fraction), att,
                      "-" if r.register_norm_mean is None else f"{r.register_norm_mean:.3g}",
                      "-" if r.flagged_on_background is None else f"{r.flagged_on_background:.0%}")
    console.print(table)
    console.print(Panel(escape(report.verdict), title="verdict", style="bold"))
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/dim]")


def render_emergence(report: Any, console: "Console") -> None:
    from rich.table import Table

    for group in report.groups:
        table = Table(title=f"{group.architecture.split()[0]} with {group.registers} registers: outliers over training "
                            "(% flagged / max-over-median per block)",
                      title_justify="left", header_style="bold")
        table.add_column("step", justify="right")
        table.add_column("onset", justify="right")
        n = len(group.points[0].outlier_fraction) if group.points else 0
        for b in range(n):
            table.add_column(f"b{b} %/ratio", justify="right")
        for p in group.points:
            table.add_row("-" if p.step is None else str(p.step), "-" if p.onset_layer is None else str(p.onset_layer),
                          *[f"{100 * f:.1f}/{r:.1f}x" for f, r in zip(p.outlier_fraction, p.max_over_median)])
        console.print(table)
    for note in report.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_probe(report: ProbeReport, console: Any) -> None:
    """The paper-shaped table (rows: token types; columns: metrics with token counts) and the verdict."""
    from rich.panel import Panel
    from rich.table import Table

    m = report.model
    title = (f"{m.name} - probes at {report.layer_description} - {report.images.num_scanned} images, "
             f"{report.num_outliers}/{report.num_patch_tokens} patch tokens flagged "
             f"({_fmt_pct(report.outlier_fraction)}, threshold {report.threshold_mode}"
             f"{'' if report.threshold is None else f' {report.threshold:.4g}'})")
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    for col, just in (("tokens", "left"), ("position top-1 (chance)", "right"), ("pos. dist [patches]", "right"),
                      ("recon. L2 (FVU)", "right"), ("local n train/test", "right"), ("nbr. cos median", "right"),
                      ("global top-1", "right"), ("global n img", "right")):
        table.add_column(col, justify=just)
    for r in report.rows:
        if r.local_status == "ok":
            pos = f"{_fmt_pct(r.position_top1)} ({_fmt_pct(r.position_chance)})"
            dist = f"{r.position_distance:.2f}"
            rec = f"{r.reconstruction_l2:.4f} ({r.reconstruction_fvu:.3f})"
        elif r.local_status == "n/a":
            pos = dist = rec = "-"
        else:
            pos, dist, rec = r.local_status, "", ""
        nloc = "-" if r.local_status == "n/a" else f"{r.local_train_tokens}/{r.local_test_tokens}"
        nbr = "-" if r.neighbour_similarity_median is None else f"{r.neighbour_similarity_median:.3f} (n={r.neighbour_tokens})"
        if r.global_status == "ok":
            glob = f"{_fmt_pct(r.global_top1)} ± {100 * (r.global_top1_std or 0):.1f}"
            if r.global_chance is not None:
                glob += f" (chance {_fmt_pct(r.global_chance)})"
        else:
            glob = r.global_status if r.global_status != "n/a" else "-"
        style = "bold red" if r.name == "outlier" else ("dim" if r.name == "normal (n-matched)" else "")
        table.add_row(r.name, pos, dist, rec, nloc, nbr, glob, str(r.global_images) if r.global_images else "-",
                      style=style)
    console.print(table)
    if m.kind == "phantom":
        console.print(Panel(m.calibration_note or "", title="calibration phantom", style="yellow"))
    colour = {"artifact-like": "red", "content-like": "green", "clean": "green"}.get(report.verdict.label, "yellow")
    body = report.verdict.summary + ("\n" + "\n".join(f"- {r}" for r in report.verdict.reasons)
                                     if report.verdict.reasons else "")
    console.print(Panel(body, title=f"verdict: {report.verdict.label}", style=f"bold {colour}"))
    for note in report.notes:
        if note != m.calibration_note:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"[dim]Threshold - {report.threshold_reason}. Protocol: artifactscan probe --help, or "
                  "'protocol' in report.json.[/dim]")
