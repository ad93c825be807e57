"""tools/browser_check.py on a small synthetic site: good pages pass, and each defect it must catch is caught.

The real book is checked by ``make browser-test`` after ``make book`` (CI); these tests check the checker,
with headless Chromium (Debian ``chromium``), and are skipped where it is not installed.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import browser_check  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
MATHJAX = ROOT / "_build" / "npm" / "node_modules" / "mathjax" / "es5"
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
REPO = "https://github.com/o/r"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason="headless Chromium (Debian package chromium) is not installed"),
]


FIGURE = (
    '<figure class="align-default" id="fig-x"><img src="{src}" style="{style}">'
    '<figcaption><p><span class="caption-number">Fig. 1 </span><span class="caption-text">A caption.</span></p></figcaption></figure>'
)
TABLE = '<table><tr><th>result</th><th>status</th></tr><tr><td>Thm 1: 2|E|² error</td><td>verified | 3</td></tr></table>'  # pipes in cells are not Markdown


def _png(width: int, height: int, dpi: float) -> bytes:
    """A blank grey PNG with a pHYs chunk (as matplotlib writes one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    ppm = round(dpi / 0.0254)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_png_dpi_reads_what_matplotlib_writes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1))
    fig.savefig(tmp_path / "f.png", dpi=137)
    plt.close(fig)
    assert abs(browser_check.png_dpi(tmp_path / "f.png") - 137) < 0.05
    (tmp_path / "g.png").write_bytes(_png(3, 2, dpi=300))
    assert abs(browser_check.png_dpi(tmp_path / "g.png") - 300) < 0.05
    assert browser_check.png_dpi(tmp_path / "missing.png") is None


def _page(body: str, math: bool = False, depth: int = 2) -> str:
    up = "../" * depth
    script = f'<script defer src="{up}mathjax/tex-mml-chtml.js"></script>' if math else ""
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>t</title>{script}</head><body><main>{body}</main></body></html>"


def _colab(name: str) -> str:
    return f'<a href="https://colab.research.google.com/github/o/r/blob/main/{name}">Colab</a>'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not (MATHJAX / "tex-mml-chtml.js").is_file():
        pytest.skip("MathJax is installed by `make book` (npm); needed for the rendered-equation case")
    root = tmp_path_factory.mktemp("site")
    (root / "mathjax").symlink_to(MATHJAX, target_is_directory=True)
    (root / "ok.png").write_bytes(PNG_1x1)
    # A 2000-px-wide figure saved at 100 dpi (20 in), shown 400 px wide: its 9-pt text is 9*100/96*0.2 = 1.9 pt.
    (root / "big.png").write_bytes(_png(2000, 40, dpi=100))
    (root / "index.html").write_text('<!doctype html><meta http-equiv="refresh" content="0; url=notebooks/flag/good.html">')
    part = root / "notebooks" / "flag"
    part.mkdir(parents=True)
    math = '<p>Inline <span class="math notranslate nohighlight">\\(x^2+1\\)</span> and</p><div class="math notranslate nohighlight">\\[\\sum_i a_i\\]</div>'
    pages = {
        "good": math + FIGURE.format(src="../../ok.png", style="") + TABLE + _colab("notebooks/flag/good.ipynb"),
        # the page-check rules of issue 12, one doctored page each
        "dollar": math + "<p>the head overlap $R$ of a layer</p>" + _colab("notebooks/flag/dollar.ipynb"),
        "output-tex": math + '<div class="cell_output"><pre>mean $R$ = 0.19</pre></div>' + _colab("notebooks/flag/output-tex.ipynb"),
        "md-table": math + '<div class="cell_output"><p>| result | claim | status |—|—|—| Thm 1 | x | verified |</p></div>'
        + _colab("notebooks/flag/md-table.ipynb"),
        "md-table-ascii": math + "<p>| a | b | |---|---| | 1 | 2 |</p>" + _colab("notebooks/flag/md-table-ascii.ipynb"),
        "xref": math + '<p>as in (<a class="reference internal" href="#c">Corollary </a>)</p>' + _colab("notebooks/flag/xref.ipynb"),
        "unpublished": math + "<p>The formula is reconstructed in spec A.15.</p>" + _colab("notebooks/flag/unpublished.ipynb"),
        "repr": math + '<div class="cell_output"><pre>Layout(split=&lt;function split_phi3 at 0x7f3a&gt;)</pre></div>'
        + _colab("notebooks/flag/repr.ipynb"),
        "wide": math + '<div style="width:1900px">a wide table</div>' + _colab("notebooks/flag/wide.ipynb"),
        "uncaptioned": math + '<img src="../../ok.png">' + _colab("notebooks/flag/uncaptioned.ipynb"),
        "tiny-font": math + FIGURE.format(src="../../big.png", style="width:400px") + _colab("notebooks/flag/tiny-font.ipynb"),
        "binder": math + '<a href="https://mybinder.org/v2/gh/o/r/main?urlpath=tree/notebooks/flag/binder.ipynb">Binder</a>'
        + _colab("notebooks/flag/binder.ipynb"),
        "raw-tex": "<p>Unrendered \\(x^2\\) here and $$y$$ there.</p>" + _colab("notebooks/flag/raw-tex.ipynb"),
        "broken-image": math + '<img src="../../missing.png">' + _colab("notebooks/flag/broken-image.ipynb"),
        "console-error": math + "<script>console.error('boom')</script>" + _colab("notebooks/flag/console-error.ipynb"),
        "error-cell": math + '<div class="cell_output"><div class="output traceback">ValueError</div></div>' + _colab("notebooks/flag/error-cell.ipynb"),
        "stderr-traceback": math + '<div class="output stderr"><pre>Traceback (most recent call last):\n  x\nKeyError: 1</pre></div>'
        + _colab("notebooks/flag/stderr-traceback.ipynb"),
        "no-launch": math,
        "wrong-launch": math + _colab("notebooks/flag/other.ipynb"),
        "no-twin": math + _colab("notebooks/flag/no-twin.ipynb"),
    }
    for name, body in pages.items():  # raw-tex: MathJax failed to load (e.g. from a CDN, offline)
        (part / f"{name}.html").write_text(_page(body, math=name != "raw-tex"))
        if name not in ("no-twin",):
            (part / f"{name}.ipynb").write_text("{}")  # the repository's paired twin
    return root


@pytest.fixture(scope="module")
def records(site, tmp_path_factory):
    pages = ["index.html"] + [f"notebooks/flag/{p.stem}.html" for p in sorted((site / "notebooks" / "flag").glob("*.html"))]
    out = tmp_path_factory.mktemp("shots")
    result = browser_check.run(site, pages, out, CHROMIUM, repo=site)
    return {r["page"]: r for r in result}, out


def test_good_pages_pass_and_are_photographed(records):
    by_page, out = records
    good = by_page["notebooks/flag/good.html"]
    assert good["problems"] == []
    assert good["mjx_containers"] == 2 and good["images"] == 1 and not good["broken_images"]
    assert (out / good["screenshot"]).stat().st_size > 1000
    index = by_page["index.html"]
    assert index["url"].endswith("notebooks/flag/good.html") and index["problems"] == []  # the redirect was followed


@pytest.mark.parametrize(
    "page, problem",
    [
        ("raw-tex", "raw TeX"),
        ("raw-tex", "no rendered equation"),
        ("broken-image", "images that did not load"),
        ("console-error", "console errors"),
        ("error-cell", "error outputs"),
        ("stderr-traceback", "error outputs"),
        ("no-launch", "no Colab launch button"),
        ("wrong-launch", "does not open notebooks/flag/wrong-launch.ipynb"),
        ("no-twin", "not in the repository"),
        ("dollar", "literal $"),
        ("output-tex", "TeX printed as text"),
        ("md-table", "raw Markdown table"),
        ("md-table-ascii", "raw Markdown table"),
        ("xref", "cross-reference without a number"),
        ("unpublished", "unpublished material"),
        ("repr", "object repr"),
        ("wide", "wider than its viewport"),
        ("uncaptioned", "without a numbered caption"),
        ("tiny-font", "pt as displayed"),
        ("binder", "Binder"),
    ],
)
def test_each_defect_is_caught(records, page, problem):
    by_page, _ = records
    problems = by_page[f"notebooks/flag/{page}.html"]["problems"]
    assert any(problem in p for p in problems), problems


def test_main_refuses_a_missing_build(tmp_path, capsys):
    assert browser_check.main(["--html", str(tmp_path), "--out", str(tmp_path / "shots")]) == 2
    assert "make book" in capsys.readouterr().err
