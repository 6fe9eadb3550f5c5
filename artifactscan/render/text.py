"""Terminal rendering: the tables (:mod:`artifactscan.render.table`) and panels the CLI prints for every result."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

from rich.markup import escape
from rich.text import Text

from artifactscan.core.numbers import percent as _pct
from artifactscan.analysis.probes.types import ProbeReport
from artifactscan.analysis.scan import ScanReport
from artifactscan.models.phantom_notice import PHANTOM_TITLE, is_phantom
from artifactscan.render.table import Column, FitTable, num, pct, ratio, spread_order

NOT_AN_ARTIFACT_HINT = (
    "A high norm alone does not prove an artifact: content tokens (e.g. saturated object patches) can be large too. "
    "Run `artifactscan probe` to test the paper's other signatures."
)


NEAR_MISS_MIN_RATIO = 1.5  # the terminal lists rejected groups from 1.5x the bulk; report.json keeps every layer's


def near_misses(report: ScanReport, min_ratio: float = NEAR_MISS_MIN_RATIO) -> list[str]:
    """One line per layer without outliers whose strongest candidate group (``separation["rejected"]``) stands at
    least ``min_ratio`` x above the bulk: the groups a user may want to look at ("a 1.8x group of 0.4% of tokens,
    rejected: ratio 1.8x < 2.5x"). Smaller candidates (a split inside the bulk) stay in the JSON only."""
    out = []
    for lay in report.layers:
        d = lay.separation or {}
        if lay.threshold is None and d.get("rejected") and d.get("ratio", 0) >= min_ratio:
            out.append(f"{lay.name}: a {d['ratio']:.1f}x group of {_pct(d['group_share'])} of tokens "
                       f"({d['group_tokens']}) above a {d['gap']:.2f}x gap - rejected: {'; '.join(d['rejected'])}")
    return out


def phantom_panel(console: "Console", results: Any) -> None:
    """The yellow panel with the phantom's note, once, when any of ``results`` is on the calibration phantom."""
    from rich.panel import Panel

    phantom = next((r for r in results if is_phantom(r)), None)
    if phantom is not None:
        console.print(Panel(phantom.model.calibration_note or "", title=PHANTOM_TITLE, style="yellow"))


def render_calibration(report: Any, console: "Console") -> None:
    """The detection-limit table of ``artifactscan calibrate`` and its headline."""
    from rich.panel import Panel

    table = FitTable([
        Column("gain"), Column("planted", drop=2, long="planted per image"),
        Column("share", drop=3, long="planted share of patch tokens"),
        Column("ratio", long="ratio at the weakest block"), Column("at onset", drop=1, long="ratio at the onset"),
        Column("prec", long="precision"), Column("recall"), Column("onset err", drop=1, long="onset error"),
        Column("blocks", drop=1, long="blocks found"),
    ], title=f"Detection limit: phantoms built from {report.base}, onset block {report.onset} of "
             f"{report.num_blocks}, scanned on {report.images.source}")
    for c in report.cells:
        found = c.recall >= 0.95 and c.precision >= 0.95 and c.onset_error == 0
        # Three significant digits, not ratio()'s one decimal: near the rule's 2.5x, 2.46x must not read "2.5x".
        table.add_row(f"{num(c.gain)}x", f"{c.planted_per_image}/img", pct(c.planted_share), f"{num(c.ratio)}x",
                      f"{num(c.ratio_at_onset)}x", "-" if c.precision != c.precision else f"{c.precision:.2f}",
                      f"{c.recall:.2f}", "-" if c.onset_error is None else f"{c.onset_error:+d}",
                      f"{c.blocks_detected}/{c.blocks_planted}", style="" if found else "red")
    table.print(console)
    console.print(Panel(report.headline, title="detection limit (calibration phantoms)", style="bold"))
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/dim]", highlight=False)


def render_scan(report: ScanReport, console: "Console") -> None:
    """The per-layer table and the headline, for humans."""
    from rich.panel import Panel

    m = report.model
    prefix = f"{m.num_cls_tokens} CLS + {m.num_register_tokens} register" if m.num_prefix_tokens else "no prefix"
    title = (f"{m.name} ({m.arch or m.source}) - {m.num_blocks} blocks, {prefix} tokens, "
             f"{m.grid_size[0]}x{m.grid_size[1]} patches - {report.images.num_scanned} images")
    table = FitTable([
        Column("layer", "left"), Column("median"), Column("p99", drop=3), Column("max", drop=2),
        Column("max/med", long="max/median"), Column("thresh", drop=1, long="threshold"),
        Column("flagged", long="% flagged"), Column("images", drop=1, long="images with outliers"),
        Column(">150", drop=4, long="% above 150"), Column("prefix", "left", drop=5, long="prefix norms (mean)"),
    ], title=title)
    for lay in report.layers:
        flagged = lay.num_outliers > 0
        style = "bold red" if flagged else ("dim" if lay.is_final_norm else "")
        prefix_text = " ".join(f"{p.name}={num(p.mean)}" for p in lay.prefix[:5])
        if len(lay.prefix) > 5:
            prefix_text += f" (+{len(lay.prefix) - 5})"
        table.add_row(
            lay.name, num(lay.median), num(lay.p99), num(lay.max), ratio(lay.max_over_median),
            num(lay.threshold), pct(lay.outlier_fraction), f"{lay.images_with_outliers}/{report.images.num_scanned}",
            pct(lay.fraction_above_150), prefix_text or "-", style=style)
    table.print(console)
    near = near_misses(report)
    if near:
        console.print("[dim]Near misses (a candidate group the rule rejected, and why):[/dim]", highlight=False)
        for line in near:
            console.print(f"[dim]  {escape(line)}[/dim]", highlight=False, soft_wrap=True)
    phantom_panel(console, [report])
    console.print(Panel(report.headline, title="verdict", style="bold"))
    for note in report.notes:  # how the model was loaded: converted layout, inferred architecture, EMA or raw
        if note != report.model.calibration_note:
            console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if report.onset_layer is not None:
        console.print(f"[dim]{NOT_AN_ARTIFACT_HINT}[/dim]")
    console.print(f"[dim]Threshold rule - {report.threshold_rule}[/dim]")


def render_compare(report: Any, console: "Console") -> None:
    """One row per model: the comparison table and the verdict."""
    from rich.panel import Panel

    table = FitTable([
        Column("model", "left"), Column("regs", drop=3, long="registers"), Column("onset"),
        Column("flagged", long="% flagged (last block)"), Column("images", drop=1, long="images with outliers"),
        Column("max/med", long="max/median"), Column("peak", drop=2, long="peak % flagged"),
        Column("attn prefix", "left", drop=6, long="attention on prefix"),
        Column("reg norm", drop=5, long="register norm"), Column("on bg", drop=4, long="flagged on background"),
    ], title=report.title)
    for r in report.rows:
        att = " ".join(f"{k}={pct(v)}" for k, v in r.prefix_attention.items()) or "-"
        table.add_row(r.label, str(r.registers), "-" if r.onset_layer is None else str(r.onset_layer),
                      pct(r.outlier_fraction), pct(r.image_fraction_with_outliers), ratio(r.max_over_median),
                      pct(r.peak_outlier_fraction), att, num(r.register_norm_mean), pct(r.flagged_on_background))
    table.print(console)
    console.print(Panel(escape(report.verdict), title="verdict", style="bold"))
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/dim]")


def render_emergence(report: Any, console: "Console") -> None:
    """Per architecture and register count: one row per checkpoint, a column per block (% flagged/max-over-median);
    on a narrow terminal the blocks left out are spread over the depth, the last block kept longest."""
    for group in report.groups:
        n = len(group.points[0].outlier_fraction) if group.points else 0
        drop_rank = spread_order(n)
        table = FitTable(
            [Column("step"), Column("onset")]
            + [Column(f"b{b}", drop=1 + drop_rank[b], long=f"block {b}") for b in range(n)],
            title=f"{group.architecture.split()[0]} with {group.registers} registers: outliers over training "
                  "(per block: % flagged/max-over-median)")
        for p in group.points:
            table.add_row("-" if p.step is None else str(p.step), "-" if p.onset_layer is None else str(p.onset_layer),
                          *[f"{pct(f)}/{ratio(r)}" for f, r in zip(p.outlier_fraction, p.max_over_median)])
        table.print(console)
    for note in report.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")


def render_probe(report: ProbeReport, console: Any) -> None:
    """The paper-shaped table (rows: token types; columns: metrics with token counts) and the verdict."""
    from rich.panel import Panel

    m = report.model
    title = (f"{m.name} - probes at {report.layer_description} - {report.images.num_scanned} images, "
             f"{report.num_outliers}/{report.num_patch_tokens} patch tokens flagged "
             f"({pct(report.outlier_fraction)}, threshold {report.threshold_mode}"
             f"{'' if report.threshold is None else f' {report.threshold:.4g}'})")
    table = FitTable([
        Column("tokens", "left"), Column("pos top1", long="position top-1"),
        Column("chance", drop=3, long="position chance"),
        Column("pos dist", drop=2, long="position distance [patches]"),
        Column("recon L2", drop=4, long="reconstruction L2"), Column("FVU", long="reconstruction FVU"),
        Column("n train/test", drop=6, long="local tokens train/test"),
        Column("nbr cos", drop=1, long="neighbour cosine (median)"), Column("nbr n", drop=7, long="neighbour tokens"),
        Column("global top1", long="global top-1 (mean ± std)"), Column("g chance", drop=5, long="global chance"),
        Column("g images", drop=7, long="global images"),
    ], title=title)
    for r in report.rows:
        if r.local_status == "ok":
            local = [pct(r.position_top1), pct(r.position_chance), f"{r.position_distance:.2f}",
                     num(r.reconstruction_l2), f"{r.reconstruction_fvu:.3f}"]
        elif r.local_status == "n/a":
            local = ["-"] * 5
        else:  # "too few (n=12)": said once, in the first local column
            local = [r.local_status] + [""] * 4
        nloc = "-" if r.local_status == "n/a" else f"{r.local_train_tokens}/{r.local_test_tokens}"
        no_nbr = r.neighbour_similarity_median is None
        nbr = ["-", "-"] if no_nbr else [f"{r.neighbour_similarity_median:.3f}", str(r.neighbour_tokens)]
        if r.global_status == "ok":
            glob = [f"{pct(r.global_top1)} ± {100 * (r.global_top1_std or 0):.1f}", pct(r.global_chance)]
        else:
            glob = [r.global_status if r.global_status != "n/a" else "-", ""]
        style = "bold red" if r.name == "outlier" else ("dim" if r.name == "normal (n-matched)" else "")
        table.add_row(r.name, *local, nloc, *nbr, *glob, str(r.global_images) if r.global_images else "-",
                      style=style)
    table.print(console)
    phantom_panel(console, [report])
    colour = {"artifact-like": "red", "content-like": "green", "clean": "green"}.get(report.verdict.label, "yellow")
    body = report.verdict.summary + ("\n" + "\n".join(f"- {r}" for r in report.verdict.reasons)
                                     if report.verdict.reasons else "")
    console.print(Panel(body, title=f"verdict: {report.verdict.label}", style=f"bold {colour}"))
    for note in report.notes:
        if note != m.calibration_note:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"[dim]Threshold - {report.threshold_reason}. Protocol: artifactscan probe --help, or "
                  "'protocol' in report.json.[/dim]")


def render_attention(report: Any, console: "Console") -> None:
    """The per-block table, the query used and the headline, for humans."""
    from rich.panel import Panel

    m = report.model
    prefix = f"{m.num_cls_tokens} CLS + {m.num_register_tokens} register" if m.num_prefix_tokens else "no prefix"
    q = report.query
    title = (f"{m.name} - {m.num_blocks} blocks, {prefix} tokens, {m.grid_size[0]}x{m.grid_size[1]} patches - "
             f"{report.images.num_scanned} images - query: {q.name}")
    table = FitTable([
        Column("block", "left"), Column("outliers", long="outliers (% of patches)"),
        Column(f"{q.name}->out", long=f"{q.name} -> outliers"), Column("spike", drop=1, long=f"{q.name} spike"),
        Column("patch->out", drop=2, long="patch queries -> outliers"),
        Column("p spike", drop=3, long="patch queries spike"),
        Column(f"{q.name}->prefix", "left", drop=5, long=f"{q.name} -> prefix"),
        Column(f"{q.name}->patches", drop=4, long=f"{q.name} -> patches"),
    ], title=title)
    for lay in report.layers:
        s, p = lay.query, lay.patch_queries
        spike = s.spike or 0.0
        style = "bold red" if spike >= 5 else ""
        prefix_text = " ".join(f"{k}={pct(v)}" for k, v in list(s.prefix.items())[:5])
        if len(s.prefix) > 5:
            prefix_text += f" (+{len(s.prefix) - 5})"
        table.add_row(str(lay.block), "no mask" if lay.outlier_fraction is None else pct(lay.outlier_fraction),
                      pct(s.outliers), ratio(s.spike), pct(p.outliers), ratio(p.spike), prefix_text or "-",
                      pct(s.patches), style=style)
    table.print(console)
    console.print(f"query: {q.name} - {q.reason}" + (f"; also mapped: patch {report.query_patch[0]},"
                                                     f"{report.query_patch[1]}" if report.query_patch else ""))
    phantom_panel(console, [report])
    console.print(Panel(report.headline, title="attention on outliers", style="bold"))
    console.print(f"[dim]Outliers - {report.outlier_rule}. Threshold rule - {report.threshold_rule}[/dim]")


def render_discover(report: Any, console: "Console") -> None:
    """One row per run, the headline, the rules."""
    from rich.panel import Panel

    d = report.data
    first = report.runs[0]
    console.print(f"data: {d.description}", highlight=False)
    runs = report.runs
    # A column per run; on a narrow terminal the later runs are left out first (the stacked layout shows them all).
    table = FitTable([Column("", "left")] + [Column(r.label, drop=1 + i) for i, r in enumerate(runs)],
                     title=f"LOST on {first.features} of block {first.block}, k={first.k}")
    flagged = [r.threshold is not None for r in runs]
    rows = [
        ("CorLoc (LOST)", [pct(r.corloc) for r in runs]),
        ("CorLoc, centred box", [pct(r.corloc_centre) for r in runs]),
        ("CorLoc, random box", [pct(r.corloc_random) for r in runs]),
        ("mean IoU", ["-" if r.mean_iou is None else f"{r.mean_iou:.2f}" for r in runs]),
        ("seeds on outlier tokens", [f"{r.seeds_on_outliers}/{r.num_images}" if f else "none flagged"
                                     for r, f in zip(runs, flagged)]),
        ("outliers' share of tokens", [pct(r.outlier_share) if f else "-" for r, f in zip(runs, flagged)]),
        ("seed rate / share", [ratio(r.seed_outlier_enrichment) for r in runs]),
        ("CorLoc, seed on an outlier", [pct(r.corloc_seed_on_outlier) for r in runs]),
        ("CorLoc, seed elsewhere", [pct(r.corloc_seed_elsewhere) for r in runs]),
    ]
    if not any(r.num_scored for r in runs):  # no ground truth: no CorLoc rows
        rows = [row for row in rows if not row[0].startswith(("CorLoc", "mean IoU"))]
    for name, cells in rows:
        table.add_row(name, *cells, style="bold" if name == "CorLoc (LOST)" else "")
    table.print(console)
    phantom_panel(console, report.runs)
    console.print(Panel(report.headline, title="object discovery", style="bold"))
    for n in report.notes:
        console.print(f"[dim]note: {n}[/dim]")
    console.print(f"[dim]CorLoc - {report.corloc_rule}. Baselines - {report.baselines}. Outliers - read at "
                  f"{first.outlier_source}; {report.threshold_rule}[/dim]")


def render_fix(result: Any, console: "Console") -> None:
    """The register neurons ``fix`` found, the before/after of the last block, the verdict, its notes and where the
    fixed model was saved."""
    from rich.panel import Panel

    if result.neurons:
        table = FitTable([Column("site", "left"), Column("unit"), Column("at outliers"), Column("at normal")],
                         title="register neurons: mean |activation| at outlier and at normal patches")
        for n in result.neurons:
            table.add_row(n.site, str(n.index), num(n.outlier_activation), num(n.normal_activation))
        table.print(console)
        console.print(f"last block: {result.before_outlier_fraction:.2%} -> {result.after_outlier_fraction:.2%} "
                      f"outliers; max/median {result.before_max_over_median:.1f}x -> "
                      f"{result.after_max_over_median:.1f}x")
    console.print(Panel(result.verdict, title="verdict", style="bold"))
    for note in result.notes:
        console.print(Text(plain_line(note), style="dim"))
    if result.saved_to:
        console.print(Text.assemble("saved the fixed model to ", plain_line(result.saved_to)), soft_wrap=True,
                      highlight=False)


def plain_line(text: Any) -> str:
    """Any message as one printable line, never read as rich markup (file names may hold ``[bold]``): its
    newlines folded, control characters and non-UTF-8 bytes escaped."""
    from artifactscan.core.paths import display_name

    return display_name(" ".join(str(text).split("\n")).strip())


def render_written(console: "Console", written: Any, out: Any, what: str) -> None:
    """``wrote N files to OUT/ (what)``: the line every command prints after writing its --out folder."""
    from artifactscan.core.paths import display_name

    count = written if isinstance(written, int) else len(written)
    console.print(Text.assemble("wrote", " ", plain_line(f"{count} files to {display_name(out)}/ ({what})")),
                  soft_wrap=True, highlight=False)


def render_discover_written(console: "Console", out: Any, figures: bool) -> None:
    """The line ``discover --out`` prints after writing its folder."""
    from artifactscan.core.paths import display_name

    console.print(Text.assemble("wrote", " ", plain_line(f"discover.json{' and discover.png' if figures else ''} to "
                                                         f"{display_name(out)}/")), soft_wrap=True, highlight=False)


def render_train_reg_verdict(verdict: Any, run_dir: Any, console: "Console") -> None:
    """train-reg's verdict: the comparison of the trained models, their held-out accuracy, the run folder."""
    from artifactscan.analysis.run_files import HELD_OUT_COMPARISON_FILE
    from artifactscan.core.paths import display_name

    render_compare(verdict.comparison, console)
    console.print("held-out accuracy: " + ", ".join(f"{k} {a:.1%}" for k, a in verdict.validation_accuracy.items()))
    console.print(Text.assemble("run folder:", " ", plain_line(f"{display_name(run_dir)} ({HELD_OUT_COMPARISON_FILE}, "
                                                                "compare.png, checkpoints per model)")), soft_wrap=True,
                  highlight=False)
