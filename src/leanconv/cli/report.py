"""``leanconv report DIR``: rebuild report.md and report.html from DIR/results.jsonl.

Read DIR/results.jsonl (written by the compare command) and write DIR/report.md,
DIR/report.html (self-contained: figures embedded, opens offline) and DIR/figures/*.png.
Nothing is measured: every number comes from the record, so two builds differ only in the
line that starts with 'Built:'.
"""

from __future__ import annotations

import argparse

from leanconv.report.build import build_report

__all__ = ["HELP", "add_arguments", "run"]


HELP = "rebuild report.md and report.html from DIR/results.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="the folder that holds results.jsonl")


def run(args: argparse.Namespace) -> int:
    paths = build_report(args.dir)
    print(f"wrote {paths['html']}")
    print(f"wrote {paths['markdown']}")
    figures = [str(p) for name, p in paths.items() if name not in ("html", "markdown")]
    print(f"figures: {', '.join(figures)}")
    return 0
