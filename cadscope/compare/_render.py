"""A report as a terminal table and as one self-contained HTML page with plots."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, TextIO

import numpy as np

from ._report import FeatureResult, Report
from ._stats import psi_band

__all__ = ["render_html", "render_table"]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def _ratio(value: float, ci: tuple[float, float]) -> str:
    if math.isnan(value):
        return "-"
    low, high = ("?" if math.isnan(v) else f"{v:.2f}" for v in ci)
    return f"{value:.2f} [{low}-{high}]"


def _side_text(report: Report, which: str) -> str:
    side = report.baseline if which == "baseline" else report.candidate
    versions = ", ".join(
        "/".join(v for v in (e if e != "?" else "", f"FreeCAD {fc}" if fc != "?" else "", f"OCCT {o}") if v)
        for e, fc, o in sorted(side.versions)
    )
    return f"{which}: {side.label} ({side.source}; {versions or 'no jobs'})"


def _row(f: FeatureResult) -> list[str]:
    return [
        f.feature,
        f"{f.n_baseline}/{f.n_candidate}",
        f"{_ms(f.p50[0])}/{_ms(f.p50[1])}",
        f"{_ms(f.p95[0])}/{_ms(f.p95[1])}",
        _ratio(f.ratio_p95, f.ratio_p95_ci),
        "-" if math.isnan(f.ks.statistic) else f"{f.ks.statistic:.3f}",
        "-" if math.isnan(f.ks.p_value) else f"{f.ks.p_value:.3g}",
        "-" if math.isnan(f.ks_p_adjusted) else f"{f.ks_p_adjusted:.3g}",
        "-" if math.isnan(f.psi) else f"{f.psi:.3f} {psi_band(f.psi)}",
        f.verdict + (" (buckets)" if f.method == "buckets" else ""),
    ]


_HEADER = [
    "stage / operation",
    "n base/cand",
    "p50 ms",
    "p95 ms",
    "p95 ratio [95% CI]",
    "KS D",
    "KS p",
    "KS p Holm",
    "PSI",
    "verdict",
]


def render_table(report: Report, out: TextIO) -> None:
    """The comparison as a plain-text table, then outcomes, geometry and the verdict."""
    out.write(_side_text(report, "baseline") + "\n" + _side_text(report, "candidate") + "\n\n")
    rows = [_HEADER, *(_row(f) for f in report.features)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    for number, row in enumerate(rows):
        out.write(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            + "\n"
        )
        if number == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    if not report.features:
        out.write("(no stage or operation measured on both sides)\n")
    if report.outcomes:
        out.write("\noutcome         base    cand   difference [95% CI]\n")
        for o in report.outcomes:
            low, high = o.difference_ci
            out.write(
                f"{o.outcome:<14} {o.rate_baseline:6.1%} {o.rate_candidate:7.1%}   "
                f"{o.rate_candidate - o.rate_baseline:+.1%} [{low:+.1%} .. {high:+.1%}]\n"
            )
    out.write(f"\ngeometry: {report.jobs_compared} job name(s) on both sides, {len(report.mismatches)} mismatch(es)\n")
    for m in report.mismatches:
        out.write(f"  {m.job}: {m.item} {m.field}: {m.baseline!r} -> {m.candidate!r} (tolerance {m.tolerance})\n")
    reasons = []
    if report.regressions:
        reasons.append("slower: " + ", ".join(f.feature for f in report.regressions))
    if report.failures_up:
        reasons.append("the candidate fails more often")
    if report.mismatches:
        reasons.append("geometry differs")
    faster = [f.feature for f in report.features if f.verdict == "faster"]
    summary = "FAIL (" + "; ".join(reasons) + ")" if reasons else "PASS"
    out.write(f"\nverdict: {summary}" + (f"; faster: {', '.join(faster)}" if faster else "") + "\n")


def _ecdf_png(feature: FeatureResult, labels: tuple[str, str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 3.0), dpi=90)
    axes = figure.add_subplot()
    plot = feature.plot
    for key, label, colour in (("baseline", labels[0], "#1f77b4"), ("candidate", labels[1], "#d62728")):
        if feature.method == "raw":
            values = np.asarray(plot[key], dtype=np.float64) * 1000
            if values.size:
                # At most 2,000 steps a curve: the picture, not the data, goes into the page.
                step = max(1, values.size // 2000)
                shown = values[::step]
                axes.step(
                    shown, np.arange(1, values.size + 1, step) / values.size, where="post", label=label, color=colour
                )
        else:
            bounds = np.asarray(plot["bounds"][:-1], dtype=np.float64) * 1000
            cumulative = np.asarray(plot[key][:-1], dtype=np.float64) / max(plot[key][-1], 1e-300)
            axes.plot(bounds, cumulative, marker="o", label=label + " (buckets)", color=colour)
    axes.set_xscale("log")
    axes.set_xlabel("duration (ms)")
    axes.set_ylabel("share of observations")
    axes.set_title(f"{feature.feature}: {feature.verdict}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.slower{background:#fdd}.faster{background:#dfd}
.different{background:#ffd}.fail{color:#b00}.pass{color:#070}
.plots{display:flex;flex-wrap:wrap;gap:8px}
"""


def render_html(report: Report, out: TextIO) -> None:
    """One self-contained page: the verdict, the table, outcomes, geometry mismatches and an ECDF per feature."""
    e = html.escape
    labels = (report.baseline.label, report.candidate.label)
    parts: list[str] = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cadscope compare</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>cadscope compare: <span class='{'fail' if report.failed else 'pass'}'>"
        f"{'FAIL' if report.failed else 'PASS'}</span></h1>",
        f"<p>{e(_side_text(report, 'baseline'))}<br>{e(_side_text(report, 'candidate'))}<br>{e(report.timestamp)}</p>",
        "<h2>Stages and operations</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _HEADER) + "</tr>",
    ]
    for f in report.features:
        cls = f.verdict if f.verdict in ("slower", "faster", "different") else ""
        parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{e(c)}</td>" for c in _row(f)) + "</tr>")
    parts.append("</table>")
    parts.append(
        f"<p>Slower: KS p (Holm-adjusted over the features judged) &lt; {report.thresholds.alpha:g} and a p50 or "
        "p95 ratio of at least "
        f"{report.thresholds.ratio:g} whose {report.thresholds.confidence:.0%} bootstrap interval is above 1; "
        f"no verdict under {report.thresholds.min_samples} observations a side. "
        "PSI bands: &lt; 0.1 none, 0.1-0.2 moderate, &ge; 0.2 significant.</p>"
    )
    if report.outcomes:
        parts.append("<h2>Outcomes</h2><table><tr><th>outcome</th><th>baseline</th><th>candidate</th>"
                     "<th>difference [95% CI]</th></tr>")  # fmt: skip
        for o in report.outcomes:
            low, high = o.difference_ci
            parts.append(
                f"<tr><td>{e(o.outcome)}</td><td>{o.baseline} ({o.rate_baseline:.1%})</td>"
                f"<td>{o.candidate} ({o.rate_candidate:.1%})</td>"
                f"<td>{o.rate_candidate - o.rate_baseline:+.1%} [{low:+.1%} .. {high:+.1%}]</td></tr>"
            )
        parts.append("</table>")
    parts.append(f"<h2>Geometry</h2><p>{report.jobs_compared} job name(s) on both sides, "
                 f"{len(report.mismatches)} mismatch(es).</p>")  # fmt: skip
    if report.mismatches:
        parts.append("<table><tr><th>job</th><th>item</th><th>field</th><th>baseline</th><th>candidate</th>"
                     "<th>tolerance</th></tr>")  # fmt: skip
        for m in report.mismatches:
            cells: list[Any] = [m.job, m.item, m.field, m.baseline, m.candidate, m.tolerance]
            parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Distributions (ECDF)</h2><div class='plots'>")
    for f in report.features:
        if f.n_baseline and f.n_candidate:
            parts.append(f"<img alt='{e(f.feature)}' src='data:image/png;base64,{_ecdf_png(f, labels)}'>")
    parts.append("</div></body></html>\n")
    out.write("\n".join(parts))
