"""``report.html``: one self-contained page that opens offline.

Every figure is embedded as a ``data:image/png;base64`` URI and the style sheet is inline;
a Content-Security-Policy meta tag forbids loading anything else (no scripts, fonts or
remote images), so the page renders the same from a laptop, a mail attachment or an
air-gapped machine. Rendering is a pure function of the document, so rebuilding from the
same record gives the same bytes apart from the one build-time line.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from leanconv.util.files import atomic_write
from leanconv.report.document import Banner, Block, Code, Document, Figure, Heading, Paragraph, Stamp, TableBlock
from leanconv.report.tables import to_html

__all__ = ["render_html", "write_html", "data_uri", "CSP"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 80rem;
       padding: 0 1rem; color: #1d232b; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d6dbe1; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
.banner { background: #fff1e6; border: 2px solid #d9480f; color: #a13200; font-weight: 700;
          padding: 0.6rem 0.9rem; border-radius: 4px; }
.stamp { color: #6b7580; font-size: 0.85rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d6dbe1; padding: 0.25rem 0.5rem; white-space: nowrap; }
th { background: #eef1f5; white-space: normal; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:first-child { background: #f7f9fb; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ec; }
figcaption { color: #4a5561; font-size: 0.85rem; }
pre { background: #f3f5f8; padding: 0.5rem 0.7rem; overflow-x: auto; font-size: 0.8rem; }
""".strip()


def data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of the PNG file at ``path``."""
    payload = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{payload}"


def _block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Heading):
        return f'<h{block.level} id="{esc(block.anchor)}">{esc(block.text)}</h{block.level}>'
    if isinstance(block, Paragraph):
        return f"<p>{esc(block.text)}</p>"
    if isinstance(block, Banner):
        return f'<p class="banner" role="alert">{esc(block.text)}</p>'
    if isinstance(block, Stamp):
        return f'<p class="stamp">{esc(block.text)}</p>'
    if isinstance(block, TableBlock):
        return f'<div class="scroll">\n{to_html(block.table, block.kind)}\n</div>'
    if isinstance(block, Figure):
        caption = f"\n<figcaption>{esc(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure>\n<img src="{data_uri(block.path)}" alt="{esc(block.alt)}">{caption}\n</figure>'
    if isinstance(block, Code):
        return f"<p>{esc(block.label)}</p>\n<pre><code>{esc(block.text)}</code></pre>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(doc: Document) -> str:
    """The whole report as one HTML page (figures read from disk and embedded)."""
    title = html.escape(doc.title)
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n<body>\n<h1>{title}</h1>")
    body = "\n".join(_block(b) for b in doc.blocks)
    return f"{head}\n{body}\n</body>\n</html>\n"


def write_html(doc: Document, path: str | Path) -> Path:
    """Render ``doc`` and write it atomically to ``path``."""
    path = Path(path)
    text = render_html(doc)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
