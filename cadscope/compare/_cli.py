"""``cadscope compare``: is the candidate engine or version slower, faster, or different in geometry?

    cadscope compare RUN_DIR --baseline engine=freecad --candidate engine=ocp
    cadscope compare BASE_DIR CAND_DIR
    cadscope compare --prometheus URL --baseline 'occt_version="7.9.3"' --candidate 'occt_version="8.0.1"' --range 24h

Folders are ``cadscope run --out`` folders: raw span durations come from their
``traces.jsonl`` (histograms from ``metrics.prom`` when there are no traces),
geometry and outcomes from ``results.jsonl``. With ``--prometheus`` the
histograms come from the server, over ``--range``. Selectors: engine,
freecad_version, occt_version, role (``KEY=VALUE[,KEY=VALUE]``).

Exit status: 1 when the candidate is slower on a stage or operation, fails
more often, or differs in geometry; 0 otherwise; 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_compare_parser", "cmd_compare"]


class _UsageError(Exception):
    pass


def add_compare_parser(sub: Any) -> None:
    """Register ``cadscope compare`` on the CLI's subcommand parsers."""
    parser = sub.add_parser(
        "compare",
        help="a verdict between two engines or versions: per-operation statistics, geometry, exit status",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folders", nargs="*", metavar="DIR", help="one run folder holding both sides, or two")
    parser.add_argument("--baseline", metavar="SELECTOR", help="e.g. engine=freecad or occt_version=7.9.3")
    parser.add_argument("--candidate", metavar="SELECTOR", help="e.g. engine=ocp or occt_version=8.0.1")
    parser.add_argument("--prometheus", metavar="URL", help="read histograms from this Prometheus server")
    parser.add_argument("--range", default="24h", help="with --prometheus: the window (default 24h)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON (a drift report)")
    parser.add_argument("--html", metavar="FILE", help="write the report as one HTML page with plots")
    parser.add_argument("--ratio", type=float, default=1.25, help="p50/p95 ratio that counts as slower (1.25)")
    parser.add_argument("--alpha", type=float, default=0.05, help="KS significance level (0.05)")
    parser.add_argument("--min-samples", type=int, default=10, help="observations a side for a verdict (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")


def _sides(args: argparse.Namespace) -> tuple[Any, Any]:
    from ._sources import SideData, SourceError, parse_selector, read_prometheus, read_run_folder

    folders = [Path(f) for f in args.folders]
    try:
        base_sel = parse_selector(args.baseline) if args.baseline else {}
        cand_sel = parse_selector(args.candidate) if args.candidate else {}
    except SourceError as exc:
        raise _UsageError(str(exc)) from None
    if args.prometheus:
        if folders:
            raise _UsageError("give either --prometheus or run folders, not both")
        if not (base_sel and cand_sel):
            raise _UsageError("--prometheus needs --baseline and --candidate selectors")
        baseline = SideData(base_sel, args.baseline)
        candidate = SideData(cand_sel, args.candidate)
        read_prometheus(args.prometheus, args.range, [baseline, candidate])
    elif len(folders) == 1:
        if not (base_sel and cand_sel):
            raise _UsageError("one run folder needs --baseline and --candidate selectors (e.g. engine=freecad)")
        baseline = SideData(base_sel, args.baseline)
        candidate = SideData(cand_sel, args.candidate)
        read_run_folder(folders[0], [baseline, candidate])
    elif len(folders) == 2:
        baseline = SideData(base_sel, f"{folders[0]}" + (f" {args.baseline}" if base_sel else ""))
        candidate = SideData(cand_sel, f"{folders[1]}" + (f" {args.candidate}" if cand_sel else ""))
        read_run_folder(folders[0], [baseline])
        read_run_folder(folders[1], [candidate])
        if baseline.source != candidate.source:
            # Raw durations on one side and buckets on the other compare nothing like for like.
            raise _UsageError(f"{folders[0]} has {baseline.source} and {folders[1]} has {candidate.source}")
    else:
        raise _UsageError("give one run folder with --baseline/--candidate, two run folders, or --prometheus URL")
    for side, name in ((baseline, "baseline"), (candidate, "candidate")):
        if not side.features and not side.outcomes:
            raise _UsageError(f"nothing matches the {name} ({side.label})")
    return baseline, candidate


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``cadscope compare``; returns the exit status."""
    try:
        from ._render import render_html, render_table
        from ._report import Thresholds, compare_sides
        from ._sources import SourceError
    except ImportError as exc:
        print(f"cadscope compare: needs {exc.name}: pip install 'cadscope[compare]'", file=sys.stderr)
        return 2
    try:
        if not args.ratio > 1:
            raise _UsageError(f"--ratio must be above 1, not {args.ratio:g}")
        if not 0 < args.alpha < 1:
            raise _UsageError(f"--alpha must be between 0 and 1, not {args.alpha:g}")
        if args.min_samples < 1:
            raise _UsageError(f"--min-samples must be 1 or more, not {args.min_samples}")
        baseline, candidate = _sides(args)
        thresholds = Thresholds(alpha=args.alpha, ratio=args.ratio, min_samples=args.min_samples, seed=args.seed)
        report = compare_sides(baseline, candidate, thresholds)
        if args.json:
            import json

            _write(args.json, json.dumps(report.as_dict(), indent=2) + "\n")
        if args.html:
            import io

            page = io.StringIO()
            render_html(report, page)
            _write(args.html, page.getvalue())
    except (_UsageError, SourceError) as exc:
        print(f"cadscope compare: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"cadscope compare: an input file is not text ({exc.reason})", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cadscope compare: cannot read {exc.filename or 'an input'}: {exc.strerror}", file=sys.stderr)
        return 2
    render_table(report, sys.stdout)
    return 1 if report.failed else 0


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise _UsageError(f"cannot write {path}: {exc.strerror}") from None
