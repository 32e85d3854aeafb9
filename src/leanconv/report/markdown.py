"""``report.md``: the report as GitHub-flavoured Markdown, images linked as files beside it.

Rendering is a pure function of the :class:`~leanconv.report.document.Document`, so the same
record always gives the same bytes (the build-time ``Stamp`` line aside).
"""

from __future__ import annotations

from pathlib import Path

from leanconv.util.files import atomic_write
from leanconv.report.document import Banner, Block, Code, Document, Figure, Heading, Paragraph, Stamp, TableBlock
from leanconv.report.tables import to_markdown

__all__ = ["render_markdown", "write_markdown"]


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Banner):
        return f"> **{block.text}**"
    if isinstance(block, Stamp):
        return f"_{block.text}_"
    if isinstance(block, TableBlock):
        return to_markdown(block.table)
    if isinstance(block, Figure):
        caption = f"\n\n{block.caption}" if block.caption else ""
        return f"![{block.alt}]({block.href}){caption}"
    if isinstance(block, Code):
        fence = _fence(block.text)
        return f"{block.label}\n\n{fence}bash\n{block.text}\n{fence}"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(doc: Document) -> str:
    """The whole report as Markdown text (ends with a newline)."""
    parts = [f"# {doc.title}"] + [_block(b) for b in doc.blocks]
    return "\n\n".join(parts) + "\n"


def write_markdown(doc: Document, path: str | Path) -> Path:
    """Render ``doc`` and write it atomically to ``path``; figures are linked by their
    ``href``, relative to ``path``'s folder."""
    path = Path(path)
    text = render_markdown(doc)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
