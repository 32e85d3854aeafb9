"""report.html in a real browser (headless Chromium, offline): every image loads, each
comparison table has one row per method, and the page renders with its styles.

Images are checked by a copy of the page with a small probe script (the report itself
allows no scripts): on ``load`` it writes the image and row counts as ``data-*`` attributes
of ``<body>``, which ``--dump-dom`` returns. The copy relaxes the Content-Security-Policy
for that inline script only; images must still come from ``data:`` URIs.
Needs the Debian package ``chromium`` (its dependencies bring a font); skipped without it.
"""

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from leanconv.report.build import build_report
from leanconv.report.html import CSP
from test_report import write_synthetic_results

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images), b = document.body.dataset;
  b.images = imgs.length;
  b.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  b.probe = "done";
});
</script>
"""


def _chromium(profile: Path, *args: str) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Dom(HTMLParser):
    """Body attributes and, per table, its class and the ``data-key`` of each body row."""

    def __init__(self):
        super().__init__()
        self.body, self.tables = {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "table":
            self.tables.append((attrs.get("class"), []))
        elif tag == "tr" and "data-key" in attrs:
            self.tables[-1][1].append(attrs["data-key"])


def _render(page: Path, tmp_path: Path, edit=lambda html: html) -> _Dom:
    """Dump the DOM of a probe copy of ``page`` (``edit`` may change the copy first)."""
    html = page.read_text()
    assert CSP in html
    html = html.replace(CSP, CSP + "; script-src 'unsafe-inline'").replace("</body>", PROBE + "</body>")
    probe = page.with_name("probe.html")
    probe.write_text(edit(html))
    dom = _Dom()
    dom.feed(_chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()))
    assert dom.body.get("data-probe") == "done", "the probe script did not run"
    return dom


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = write_synthetic_results(tmp_path_factory.mktemp("report"))
    return build_report(folder)["html"]


def test_every_image_loads_and_tables_have_one_row_per_method(report, tmp_path):
    dom = _render(report, tmp_path)
    assert (dom.body["data-images"], dom.body["data-loaded"]) == ("4", "4")
    results = [keys for cls, keys in dom.tables if cls == "results"]
    assert results == [["baseline", "l1@0.5", "hap@0.5", "3d@0.5"], ["baseline", "hap@0.3"],
                       ["baseline", "scc", "psconv"]]
    channels = [keys for cls, keys in dom.tables if cls == "channels"]
    assert channels == [["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]]


def test_probe_notices_broken_and_external_images(report, tmp_path):
    def break_two(html):
        html = html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1)
        return html.replace("<h1>", '<img src="http://example.com/x.png" alt="x"><h1>', 1)

    dom = _render(report, tmp_path, break_two)
    assert (dom.body["data-images"], dom.body["data-loaded"]) == ("5", "3")


def test_page_renders_with_styles(report, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium(tmp_path / "profile", "--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}",
              report.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    ink = (pixels < 0.9).any(axis=-1).mean()
    assert ink > 0.03, f"page looks blank ({ink:.1%} non-white pixels)"
    banner = np.abs(pixels - np.array([0xD9, 0x48, 0x0F]) / 255).max(axis=-1) < 0.08
    assert banner.sum() > 500, "the quick-run banner's border is not drawn"
