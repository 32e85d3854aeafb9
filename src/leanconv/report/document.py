"""The report as a list of format-neutral blocks, so Markdown and HTML say the same thing.

:mod:`leanconv.report.build` lays the report out once as a :class:`Document`;
:mod:`leanconv.report.markdown` and :mod:`leanconv.report.html` each render every block
type. Text in blocks is plain (renderers escape it). ``Stamp`` is the one line that may
differ between two builds of the same ``results.jsonl`` (the build time).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Union

from leanconv.report.tables import Table

__all__ = ["Heading", "Paragraph", "Banner", "Stamp", "TableBlock", "Figure", "Code", "Block", "Document",
           "STAMP_PREFIX"]

STAMP_PREFIX = "Built:"


class Heading(NamedTuple):
    """A section title; ``anchor`` is its HTML id (letters, digits, ``-``, ``_``)."""

    level: int
    text: str
    anchor: str


class Paragraph(NamedTuple):
    text: str


class Banner(NamedTuple):
    """A warning shown prominently (the quick-run notice)."""

    text: str


class Stamp(NamedTuple):
    """The build-time line; it always starts with :data:`STAMP_PREFIX`."""

    text: str


class TableBlock(NamedTuple):
    """A table; ``kind`` is ``"results"`` (a comparison table) or ``"channels"``."""

    table: Table
    kind: str = "results"


class Figure(NamedTuple):
    """A PNG written beside the report: ``path`` on disk, ``href`` relative to the report."""

    path: Path
    href: str
    alt: str
    caption: str


class Code(NamedTuple):
    """A command to copy, introduced by ``label``."""

    label: str
    text: str


Block = Union[Heading, Paragraph, Banner, Stamp, TableBlock, Figure, Code]


class Document(NamedTuple):
    title: str
    blocks: tuple[Block, ...]
