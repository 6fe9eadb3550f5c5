"""One self-contained HTML page for a results folder (``artifactscan report RESULTS_DIR -o report.html``).

The page gathers every artifactscan result found under the folder (searched recursively): norm scans
(``report.json`` with schema ``artifactscan.scan/...``), model comparisons, emergence over training, probe reports,
attention and fix reports, and train-reg run folders. Files are recognised by their ``"schema"`` key (train-reg runs,
which write plain JSON, by their file names), so one folder may hold several results with the same file name. A
result of a kind this module does not know yet is still shown: its headline/verdict if it has one, else a compact
table of its top-level values.

Figures are embedded as base64 data URIs and the styling is inline CSS: the file opens anywhere, offline, needs no
JavaScript and prints like a paper. All text from the results is HTML-escaped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from artifactscan.core.errors import InputError
from artifactscan.core.files import unfinished_runs
from artifactscan.core.paths import display_name, what_it_is
from artifactscan.render.html_parts import (
    FigureEmbedder,
    FoundResult,
    HtmlReportSummary,
    IncludedResult,
    KIND_ORDER,
    KIND_TITLES,
    collect_results,
    esc,
    html_table,
    is_phantom_data,
    rel_path,
    slug,
)
from artifactscan.models.phantom_notice import PHANTOM_BANNER, PHANTOM_TITLE
from artifactscan.render.html_discover import discover_section
from artifactscan.render.html_kinds import attention_section, calibration_section, fix_section, signatures_section
from artifactscan.render.html_monitor import monitor_section
from artifactscan.render.html_sections import (
    compare_section,
    emergence_section,
    generic_section,
    probe_section,
    scan_section,
    training_section,
)
from artifactscan.core.version import __version__
from artifactscan.core.results import atomic_write_text

__all__ = ["HtmlReportSummary", "IncludedResult", "build_html_report", "write_html_report", "collect_results"]

# ----------------------------------------------------------------------------------------------- summary types
# ----------------------------------------------------------------------------------------------- small helpers
# ----------------------------------------------------------------------------------------------- discovery
# ----------------------------------------------------------------------------------------------- figures
# ----------------------------------------------------------------------------------------------- tables
# ----------------------------------------------------------------------------------------------- sections
_RENDERERS: dict[str, Callable[[FoundResult, Path, FigureEmbedder, IncludedResult], str]] = {
    "scan": scan_section, "compare": compare_section, "emergence": emergence_section, "probe": probe_section,
    "train-reg": training_section, "training": training_section, "discover": discover_section,
    "attention": attention_section, "fix": fix_section, "calibration": calibration_section,
    "signatures": signatures_section,
    "monitor": monitor_section,
}


# ----------------------------------------------------------------------------------------------- page
_CSS = """
:root { --ink: #1b1b1b; --dim: #666; --rule: #222; --thin: #bbb; --red: #a4161a; --redbg: #fbeaea;
        --green: #1d5e2f; --greenbg: #edf6ef; --warnbg: #fff4d6; --warn: #7a5200; }
* { box-sizing: border-box; }
html { background: #f4f3ef; }
body { font-family: "Charter", "Bitstream Charter", "Georgia", "Cambria", "Times New Roman", serif; color: var(--ink);
       line-height: 1.45; font-size: 16px; max-width: 62rem; margin: 1.5rem auto; padding: 2.2rem 2.6rem;
       background: #fff; box-shadow: 0 1px 4px rgba(0,0,0,.12); }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; font-weight: 600; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 .4rem; padding-top: .6rem; border-top: 2px solid var(--rule); }
h2 .kind { font-variant: small-caps; letter-spacing: .04em; color: var(--dim); font-weight: normal; margin-right: .4rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .3rem; }
h4 { font-size: .98rem; margin: 1rem 0 .3rem; font-style: italic; font-weight: normal; }
p { margin: .4rem 0; }
code, .path { font-family: "DejaVu Sans Mono", "Menlo", "Consolas", monospace; font-size: .82em; overflow-wrap: anywhere; }
.subtitle { color: var(--dim); margin: 0 0 1rem; font-size: .92rem; overflow-wrap: anywhere; }
.meta { color: #333; overflow-wrap: anywhere; }
.dim { color: var(--dim); }
.small { font-size: .85rem; }
.banner { border: 3px solid var(--red); background: var(--redbg); color: #5c0b0e; padding: .8rem 1rem;
          margin: 1rem 0; font-size: 1.02rem; }
.banner b { color: var(--red); font-size: 1.05rem; letter-spacing: .02em; }
.badge { display: inline-block; font-family: sans-serif; font-size: .68rem; font-weight: bold; letter-spacing: .05em;
         text-transform: uppercase; color: #fff; background: var(--red); border-radius: 3px; padding: .1rem .35rem;
         vertical-align: middle; margin-left: .4rem; }
.lead { border-left: 5px solid var(--rule); background: #f7f7f5; padding: .7rem 1rem; margin: 1rem 0; font-size: 1.08rem; }
.lead .label, .verdict .label { display: block; font-family: sans-serif; font-size: .7rem; font-weight: bold;
         letter-spacing: .08em; text-transform: uppercase; color: var(--dim); margin-bottom: .15rem; }
.lead .from { text-transform: none; letter-spacing: 0; font-weight: normal; }
.verdict { border-left: 4px solid #888; background: #f7f7f5; padding: .5rem .8rem; margin: .6rem 0; }
.verdict.flagged { border-color: var(--red); background: var(--redbg); }
.verdict.clean { border-color: var(--green); background: var(--greenbg); }
.verdict.inconclusive { border-color: var(--warn); background: var(--warnbg); }
.warn { background: var(--warnbg); color: var(--warn); padding: .3rem .6rem; }
.tablewrap { overflow-x: auto; margin: .6rem 0 .8rem; }
table { border-collapse: collapse; font-size: .86rem; font-variant-numeric: tabular-nums; }
table caption { caption-side: bottom; text-align: left; font-size: .8rem; color: var(--dim); padding-top: .3rem; }
thead tr { border-top: 2px solid var(--rule); border-bottom: 1px solid var(--rule); }
tbody tr:last-child { border-bottom: 2px solid var(--rule); }
th { font-weight: 600; text-align: left; padding: .25rem .55rem; white-space: nowrap; }
td { padding: .18rem .55rem; vertical-align: top; overflow-wrap: anywhere; }
td.num { text-align: right; white-space: nowrap; }
th.num { text-align: right; white-space: normal; vertical-align: bottom; min-width: 3.5em; }
thead th { vertical-align: bottom; }
tr.flagged td { color: var(--red); font-weight: 600; }
tr.final td { color: var(--dim); font-style: italic; }
table.keys { margin: .5rem 0; }
table.keys th { color: #333; font-weight: 600; vertical-align: top; border: none; }
table.keys tr { border: none; }
table.keys tbody tr:last-child { border-bottom: 1px solid var(--thin); }
table.keys tbody tr:first-child { border-top: 1px solid var(--thin); }
.facts { font-size: .92rem; }
ul.notes { font-size: .9rem; color: #333; margin: .4rem 0; padding-left: 1.3rem; }
details { margin: .5rem 0; }
summary { cursor: pointer; font-style: italic; }
.figrow { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; margin: .6rem 0; }
.figrow:empty { display: none; }
figure { margin: 0; }
figure.fig { flex: 1 1 26rem; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e4e4e4; background: #fff; }
figcaption { font-size: .78rem; color: var(--dim); margin-top: .2rem; overflow-wrap: anywhere; }
figcaption .path { display: block; font-size: .72rem; color: #999; }
.maps { display: grid; grid-template-columns: repeat(auto-fill, minmax(14rem, 1fr)); gap: .8rem; }
.maps figure.fig { flex: none; }
nav.toc table { width: 100%; }
nav.toc td:nth-child(3) { font-size: .82rem; color: #333; }
nav.toc a { color: inherit; }
footer { margin-top: 2.5rem; border-top: 1px solid var(--thin); padding-top: .5rem; font-size: .8rem; color: var(--dim); }
@media print {
  html { background: #fff; }
  body { box-shadow: none; margin: 0; padding: 0; max-width: none; font-size: 11pt; }
  figure, table, .banner, .verdict { break-inside: avoid; page-break-inside: avoid; }
  h2 { break-after: avoid; page-break-after: avoid; }
  details > summary { display: none; }
  details { display: block; }
  a { color: inherit; text-decoration: none; }
  .banner, .verdict, tr.flagged td { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


@dataclass
class _Warnings:
    """Every warning while building the page: listed on it, and passed on to the caller's ``warn`` as it comes."""

    forward: Callable[[str], None] | None
    lines: list[str] = field(default_factory=list)

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        if self.forward is not None:
            self.forward(msg)


def _build(results_dir: str | Path, warn: Callable[[str], None] | None = None) -> tuple[str, HtmlReportSummary]:
    """The page and what went into it: a section per result, then the figures nobody claimed."""
    root = Path(results_dir).expanduser()
    warnings = _Warnings(warn)
    found, skipped, by_dir = _find_results(root, warnings)
    figs = FigureEmbedder(root, by_dir, warnings)
    sections: list[str] = []
    included: list[IncludedResult] = []
    for i, item in enumerate(found):
        section, inc = _result_section(i, item, root, figs, warnings)
        sections.append(section)
        included.append(inc)
    other_figures = _other_figures_section(figs, root)
    if other_figures:
        sections.append(other_figures)

    lead_item = _lead_result(included)
    phantoms = [r for r in included if r.phantom]
    body = "\n".join([_phantom_banner(included, found), _lead_html(lead_item, len(included)),
                      _warnings_html(warnings.lines), _contents(included), "".join(sections)])
    page = _page(root, body, results=len(included), figures=figs.count)
    summary = HtmlReportSummary(results_dir=root, out_path=None, headline=lead_item.headline if lead_item else "",
                                results=included, figures=figs.count, phantom=bool(phantoms),
                                warnings=warnings.lines, skipped=skipped)
    return page, summary


def _find_results(root: Path, warn: Callable[[str], None]) -> tuple[list[FoundResult], list, dict]:
    """Every result under ``root`` in the page's order (by kind, then path), the JSON files skipped and the figures
    by folder; a folder that is missing or holds no result is refused in one line."""
    if not root.is_dir() and not root.is_file():  # missing, or what it is instead (a symlink loop ...)
        raise InputError(f"results folder {display_name(root)} {what_it_is(root, 'a folder')}; pass the folder "
                         "given to `artifactscan norms ... --out DIR` (or compare/probe --out)")
    if not root.is_dir():
        raise InputError(f"{display_name(root)} is a file, not a results folder; pass the folder that holds it "
                         f"(e.g. `artifactscan report {display_name(root.parent)}`)")
    try:
        found, skipped, by_dir = collect_results(root, warn)
    except OSError as exc:
        raise InputError(f"cannot read results folder {display_name(root)}: {exc.strerror or exc}") from None
    if not found:
        extra = f" ({len(skipped)} unreadable JSON file(s) skipped)" if skipped else ""
        raise InputError(f"nothing to report: {display_name(root)} holds no artifactscan results{extra}; "
                         f"{_first_run_hint(root)}")
    for line in unfinished_runs(root):  # never shown as if finished
        warn(line)
    found.sort(key=lambda f: (KIND_ORDER.index(f.kind) if f.kind in KIND_ORDER else len(KIND_ORDER),
                              rel_path(f.path, root)))
    return found, skipped, by_dir


def _result_section(i: int, item: FoundResult, root: Path, figs: FigureEmbedder,
                    warn: Callable[[str], None]) -> tuple[str, IncludedResult]:
    """The ``i``-th result's section, drawn by its kind's renderer, and what went into it."""
    rel = rel_path(item.path, root)
    inc = IncludedResult(kind=item.kind, path=rel, title=rel, headline="", schema=item.schema,
                         phantom=is_phantom_data(item.data))
    renderer = _RENDERERS.get(item.kind, generic_section)
    try:
        body = renderer(item, root, figs, inc)
    except Exception as exc:  # a malformed or newer-version file: still show what it holds
        if renderer is generic_section:
            raise
        warn(f"{rel}: could not read it as a {item.kind} result ({type(exc).__name__}: {exc}); shown as raw values")
        inc.figures.clear()
        body = generic_section(item, root, figs, inc)
    badge = f'<span class="badge">{PHANTOM_TITLE}</span>' if inc.phantom else ""
    schema = f" · schema <code>{esc(item.schema)}</code>" if item.schema else ""
    section = (f'<section id="{slug(i)}"><h2><span class="kind">{esc(KIND_TITLES.get(item.kind, item.kind))}</span>'
               f"{esc(inc.title)}{badge}</h2>"
               f'<p class="subtitle"><code>{esc(rel)}</code>{schema}</p>\n{body}</section>')
    return section, inc


def _other_figures_section(figs: FigureEmbedder, root: Path) -> str:
    """Figures nobody claimed (e.g. a new kind's extra plots), shown at the end by folder; empty when none."""
    leftovers = figs.leftovers()
    if not leftovers:
        return ""
    parts = ['<section id="other-figures"><h2><span class="kind">Other figures</span>found in the results '
             "folder</h2>"]
    for d, paths in leftovers.items():
        parts.append(f"<h4><code>{esc(rel_path(d, root))}/</code></h4>"
                     f'<div class="maps">{figs.render(paths, cls="fig map")}</div>')
    return "\n".join(parts) + "</section>"


def _lead_result(included: list[IncludedResult]) -> IncludedResult | None:
    """The result whose headline leads the page: a comparison's verdict, else the first scan's headline, else any
    result's; results on a real model before those on the calibration phantom."""
    ranked = sorted((r for r in included if r.headline), key=lambda r: r.phantom)
    return (next((r for r in ranked if r.kind == "compare"), None)
            or next((r for r in ranked if r.kind == "scan"), None)
            or next(iter(ranked), None))


def _lead_html(lead_item: IncludedResult | None, n_results: int) -> str:
    lead = lead_item.headline if lead_item else ""
    lead_from = ""
    if lead_item is not None and n_results > 1:
        lead_from = f' <span class="from">from <code>{esc(lead_item.path)}</code></span>'
    if lead_item is not None and lead_item.phantom:
        lead_from += f' <span class="badge">{PHANTOM_TITLE}</span>'
    shown = esc(lead) or '<span class="dim">no headline in these results</span>'
    return f'<div class="lead"><span class="label">headline{lead_from}</span>{shown}</div>'


def _phantom_banner(included: list[IncludedResult], found: list[FoundResult]) -> str:
    """The red banner when any result is on the calibration phantom (with the phantoms' notes); empty otherwise."""
    phantoms = [r for r in included if r.phantom]
    if not phantoms:
        return ""
    which = ("This result is" if len(included) == 1 else
             "Every result here is" if len(phantoms) == len(included) else
             f"{len(phantoms)} of the {len(included)} results here are")
    banner = f'<div class="banner" role="alert"><b>⚠ {esc(PHANTOM_BANNER.format(which=which))}</b>'
    notes = {(r.get("model") or {}).get("calibration_note") for r in (f.data for f in found)
             if isinstance(r, dict) and isinstance(r.get("model"), dict)}
    notes.discard(None)
    if notes:
        banner += "".join(f'<br><span class="small">{esc(n)}</span>' for n in sorted(notes))
    return banner + "</div>"


def _contents(included: list[IncludedResult]) -> str:
    """The table of contents: each result's kind (linking to its section), title, path and headline."""
    phantom_badge = ' <span class="badge">phantom</span>'
    toc_rows = [[f'<a href="#{slug(i)}">{esc(KIND_TITLES.get(r.kind, r.kind))}</a>',
                 f"{esc(r.title)}{phantom_badge if r.phantom else ''}"
                 f'<br><span class="path">{esc(r.path)}</span>',
                 esc(r.headline if len(r.headline) <= 260 else r.headline[:260] + "…") or '<span class="dim">–</span>']
                for i, r in enumerate(included)]
    return ('<nav class="toc"><h3>Contents</h3>'
            + html_table(["kind", "result", "headline"], toc_rows, num_from=99) + "</nav>")


def _warnings_html(warnings: list[str]) -> str:
    if not warnings:
        return ""
    return ('<details class="warn"><summary>' + f"{len(warnings)} warning(s) while building this page"
            + "</summary><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></details>")


def _page(root: Path, body: str, *, results: int, figures: int) -> str:
    """The whole document around ``body``: head, inline style, title block and footer."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"artifactscan report – {root.resolve().name}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="artifactscan {esc(__version__)}">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>High-norm artifact tokens: results</h1>
<p class="subtitle">Results folder <code>{esc(root.resolve())}</code> · {results} result(s), {figures} figure(s)
· built {esc(now)} by artifactscan {esc(__version__)}</p>
</header>
{body}
<footer>Method: Darcet, Oquab, Mairal &amp; Bojanowski, “Vision Transformers Need Registers”, ICLR 2024. A high norm alone
does not prove an artifact: content tokens can be large too; the probe results test the paper's other signatures.
This page is self-contained: figures are embedded and it needs no network or scripts.</footer>
</body>
</html>
"""


def _first_run_hint(root: Path) -> str:
    """What to run first. A folder of images gets a results folder of its own beside it, never one inside it."""
    from artifactscan.inputs.images import IMAGE_EXTENSIONS

    holds_images = any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(root) for name in names)
    if holds_images:
        folder = Path(os.path.abspath(root))
        beside = folder.parent / f"{folder.name or 'images'}-results"  # next to the images, not among them
        relative = os.path.relpath(beside)
        shown = display_name(beside if relative.startswith("..") else relative)
        return (f"it holds images: scan them into a results folder of its own, `artifactscan norms MODEL "
                f"{display_name(root)} --out {shown}`, then `artifactscan report {shown}`")
    return f"run `artifactscan norms MODEL IMAGES --out {display_name(root)}` first (or compare/probe/train-reg --out)"


def build_html_report(results_dir: str | Path, warn: Callable[[str], None] | None = None) -> str:
    """The HTML page for every artifactscan result under ``results_dir`` (searched recursively).

    Raises :class:`InputError` when the folder is missing or holds no artifactscan results. Unreadable JSON files and
    figures are skipped; each is reported through ``warn`` (and listed on the page).
    """
    return _build(results_dir, warn)[0]


def write_html_report(results_dir: str | Path, out_path: str | Path | None = None,
                      warn: Callable[[str], None] | None = None) -> HtmlReportSummary:
    """Build the page and write it to ``out_path`` (default ``RESULTS_DIR/report.html``; an existing folder gets
    ``report.html`` inside it; missing parent folders are created). Returns what went into it."""
    root = Path(results_dir).expanduser()
    out = root / "report.html" if out_path is None else Path(out_path).expanduser()
    if out.is_dir():
        out = out / "report.html"
    page, summary = _build(root, warn)

    blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise InputError(f"cannot write the report to {out}: {blocker} is a file, not a folder; choose another -o path")

    try:
        atomic_write_text(out, page)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot write the report to {out}: {reason}; choose another -o path") from None
    summary.out_path = out
    summary.bytes = len(page.encode("utf-8"))
    return summary
