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


def _page(body: str, math: bool = False, depth: int = 2) -> str:
    up = "../" * depth
    script = f'<script defer src="{up}mathjax/tex-mml-chtml.js"></script>' if math else ""
    return f"<!doctype html><html><head><title>t</title>{script}</head><body><main>{body}</main></body></html>"


def _colab(name: str) -> str:
    return f'<a href="https://colab.research.google.com/github/o/r/blob/main/{name}">Colab</a> <a href="https://mybinder.org/v2/gh/o/r/main?urlpath=tree/{name}">Binder</a>'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not (MATHJAX / "tex-mml-chtml.js").is_file():
        pytest.skip("MathJax is installed by `make book` (npm); needed for the rendered-equation case")
    root = tmp_path_factory.mktemp("site")
    (root / "mathjax").symlink_to(MATHJAX, target_is_directory=True)
    (root / "ok.png").write_bytes(PNG_1x1)
    (root / "index.html").write_text('<!doctype html><meta http-equiv="refresh" content="0; url=notebooks/flag/good.html">')
    part = root / "notebooks" / "flag"
    part.mkdir(parents=True)
    math = '<p>Inline <span class="math notranslate nohighlight">\\(x^2+1\\)</span> and</p><div class="math notranslate nohighlight">\\[\\sum_i a_i\\]</div>'
    pages = {
        "good": math + '<img src="../../ok.png">' + _colab("notebooks/flag/good.ipynb"),
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
    ],
)
def test_each_defect_is_caught(records, page, problem):
    by_page, _ = records
    problems = by_page[f"notebooks/flag/{page}.html"]["problems"]
    assert any(problem in p for p in problems), problems


def test_main_refuses_a_missing_build(tmp_path, capsys):
    assert browser_check.main(["--html", str(tmp_path), "--out", str(tmp_path / "shots")]) == 2
    assert "make book" in capsys.readouterr().err
