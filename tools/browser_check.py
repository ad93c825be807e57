"""Load the built book in headless Chromium and check what a reader sees.

    python tools/browser_check.py [--html _build/html] [--out _build/screenshots] [--all] [PAGE ...]

Serves the built HTML on localhost (``http.server`` in a thread) and drives Debian's ``chromium`` through
the DevTools protocol over a pipe (``--remote-debugging-pipe``: no websocket library, no npm package). For
each page (default: the index, one page of each paper's part, the fork template, the results and
performance pages when built; ``--all``, as ``make book`` runs it: every built page) it asserts:

* **equations rendered**: MathJax produced ``mjx-container`` elements for every ``.math`` element, and no raw
  TeX delimiters (``$$``, ``\\(``, ``\\[``) are left in the page's text (code and outputs excluded);
  pages of the three paper parts must contain equations at all;
* **every image loaded** (``naturalWidth > 0``, after forcing lazy images to load);
* **no error output cells** (``.output.error``, ``.output.traceback``, or a stderr block with a Python traceback);
* **no console errors** (console.error, uncaught exceptions, failed requests, browser log errors);
* **launch buttons** on notebook pages: a Colab link to the page's own ``.ipynb`` in the repository, and that
  ``.ipynb`` exists in the working tree (the paired, output-free twin); no Binder button (Binder cannot build
  this book's environment);
* **what a reader sees** (:func:`reader_problems`): no literal ``$`` in the text outside code and math, no TeX
  printed in a text output, no raw Markdown table, no cross-reference without a number or title, no reference
  to our unpublished notes, no object repr, no page wider than the 1280-px viewport, every figure inside a
  ``<figure>`` with a numbered caption, and its smallest text (the book style's ``MIN_FONT_PT``) at least 9 pt
  as displayed, from the PNG's dpi and its displayed width.

A PNG screenshot of each page goes to ``--out`` (CI artefacts), with ``report.json``. Exit status 1 if any
check fails. Chromium: ``$CHROMIUM`` or /usr/bin/chromium (Debian package ``chromium``).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from toc import toc_files, toc_root  # noqa: E402  (tools/toc.py)

sys.path.insert(0, str(ROOT))
from flagcore.plotting import MIN_FONT_PT  # noqa: E402  (the smallest text the book's figure style draws)

READABLE_PT = 9.0  # the smallest text a reader should meet, as displayed (CSS points)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
]
DEFAULT_PAGES = [
    "index.html",
    "notebooks/flag/head-overlap.html",
    "notebooks/lightning/softmax-figure3.html",
    "notebooks/collapse/dong-rank-collapse.html",
    "notebooks/fork/any-model.html",
    "book/results.html",
    "book/performance.html",
]
MATH_PARTS = ("notebooks/flag/", "notebooks/lightning/", "notebooks/collapse/")

# Runs in the page after load: waits for MathJax and for every image, then measures.
PAGE_CHECK_JS = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const wantsMath = document.querySelector(".math, script[src*='mathjax']") !== null;
  for (let i = 0; wantsMath && i < 200 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++) await sleep(50);
  const mathjax = !!(window.MathJax && MathJax.startup && MathJax.startup.promise);
  if (mathjax) { try { await MathJax.startup.promise; } catch (e) { console.error("MathJax: " + e); } }
  const images = [...document.images];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); setTimeout(r, 10000); })));
  const main = document.querySelector("main") || document.querySelector("article") || document.body || document.documentElement;
  const clone = main.cloneNode(true);
  clone.querySelectorAll("pre, code, .cell_output, .output, mjx-container, script, style, .highlight").forEach(e => e.remove());
  const text = clone.textContent;
  const raw = [];
  for (const pattern of ["$$", "\\(", "\\)", "\\[", "\\]", "\\begin{"]) {
    const at = text.indexOf(pattern);
    if (at >= 0) raw.push(pattern + " … " + text.slice(Math.max(0, at - 40), at + 40).replace(/\s+/g, " "));
  }
  // The reader's prose: everything in the article except code, math and scripts (outputs included:
  // a Markdown table that reached an output as text is as broken as one in the prose).
  const article = document.querySelector("article") || main;
  const prose = article.cloneNode(true);
  prose.querySelectorAll("pre, code, .highlight, mjx-container, .math, script, style, .headerlink").forEach(e => e.remove());
  const proseText = prose.textContent;
  const around = (t, at) => t.slice(Math.max(0, at - 50), at + 50).replace(/\s+/g, " ");
  const hits = (t, re) => { const out = []; let m; const g = new RegExp(re.source, re.flags.includes("g") ? re.flags : re.flags + "g");
    while ((m = g.exec(t)) && out.length < 5) out.push(around(t, m.index)); return out; };
  const dollars = hits(proseText, /\$/);
  const outputTex = [...article.querySelectorAll(".cell_output pre, .output pre")].flatMap(e => hits(e.textContent, /\$[^$\s][^$\n]*\$/));
  // A Markdown table that was not parsed shows its separator row as text ("|---|", "|—|" after smart quotes).
  const mdTables = hits(proseText, /\|\s*:?[-\u2012-\u2015]+:?\s*\|/);
  const kinds = "Theorem|Lemma|Corollary|Proposition|Definition|Conjecture|Remark|Example|Assumption|Algorithm|Property|Observation|Figure|Fig\\.|Table|Equation|Eq\\.|Section";
  const bare = new RegExp("^\\(?(" + kinds + ")\\s*\\)?$");
  const numberless = [...article.querySelectorAll("a.reference.internal")].map(a => a.textContent.trim()).filter(t => bare.test(t))
      .concat(hits(proseText, new RegExp("\\b(" + kinds + ")\\s+[).,;:\\]]")));
  // Our internal working notes are not part of the book: no page may send a reader to them (code included).
  const fullText = article.textContent;
  const unpublished = hits(fullText, /\bspec\b|checks_\w+\.py|seed copy|\bextraction\b|lightning\.md|flag_and_collapse|offline\.md|shared\/(spec|papers)|\bour (working )?notes\b/i);
  const reprs = hits(fullText, /<[\w.]+( object)? at 0x[0-9a-f]+>|<function [\w.]+ at 0x/);
  const figures = [...article.querySelectorAll("img")].filter(img => !img.closest(".navbar-brand, .logo, header, nav")).map(img => {
    const fig = img.closest("figure");
    const cap = fig ? fig.querySelector("figcaption") : null;
    return { src: img.getAttribute("src"), natural: img.naturalWidth, shown: img.getBoundingClientRect().width,
             captioned: !!cap && cap.textContent.trim().length > 0, numbered: !!(cap && cap.querySelector(".caption-number")) };
  });
  const stderr = [...document.querySelectorAll(".output.stderr, .stderr")].map(e => e.textContent);
  const launch = [...document.querySelectorAll("a[href]")].map(a => a.href).filter(h => /colab\.research\.google\.com|mybinder\.org/.test(h));
  return {
    url: location.href,
    title: document.title,
    mathjax_loaded: mathjax,
    math_elements: document.querySelectorAll(".math").length,
    math_unrendered: [...document.querySelectorAll(".math")].filter(e => !e.querySelector("mjx-container")).length,
    mjx_containers: document.querySelectorAll("mjx-container").length,
    mjx_errors: document.querySelectorAll("mjx-merror, [data-mjx-error]").length,
    raw_tex: raw,
    images: images.length,
    broken_images: images.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute("src")),
    error_outputs: document.querySelectorAll(".output.error, .output.traceback, .traceback").length,
    stderr_tracebacks: stderr.filter(t => /Traceback \(most recent call last\)|^\w+Error: /m.test(t)).length,
    stderr_blocks: stderr.length,
    launch_links: launch,
    height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
    page_width: document.documentElement.scrollWidth,
    viewport_width: window.innerWidth,
    dollars: dollars, output_tex: outputTex, md_tables: mdTables, numberless_refs: numberless,
    unpublished: unpublished, reprs: reprs, figures: figures,
  };
})()
"""


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: events out)."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # put the pipe ends where Chromium expects them (copies first: they may be 3 or 4)
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=child_fds,  # kept open after preexec_fn, when the others are closed
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 60) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
            self.events.append(event)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``directory`` on a free localhost port, in a daemon thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the CI log readable
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _settle(browser: Chromium, session: str, timeout: float = 30) -> None:
    """Wait until the page is fully loaded and is not a meta-refresh page about to navigate away."""
    expression = "[document.readyState, !!document.body, !!document.querySelector('meta[http-equiv=refresh i]')]"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state, body, refresh = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)["result"]["value"]
        except (RuntimeError, KeyError, TypeError, ValueError):
            state, body, refresh = "loading", False, False
        if state == "complete" and body and not refresh:
            return
        time.sleep(0.2)
    raise TimeoutError("the page did not settle")


def _console_errors(events: list[dict], session: str) -> list[str]:
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console." + params["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append("uncaught: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            if entry.get("url", "").endswith("/favicon.ico"):  # requested by the browser itself, not by the page
                continue
            errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            errors.append(f"request failed: {params.get('errorText')} ({params.get('type')})")
    return errors


def check_page(browser: Chromium, base_url: str, page: str, out: Path, repo: Path = ROOT, html: Path | None = None) -> dict:
    """Load one page, run the checks, save its screenshot; returns the page's record with ``problems``."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
    start = time.perf_counter()
    nav = browser.send("Page.navigate", {"url": base_url + page}, session=session)
    problems = []
    if nav.get("errorText"):
        problems.append(f"navigation failed: {nav['errorText']}")
    browser.wait_for("Page.loadEventFired", session, timeout=60)
    _settle(browser, session)  # e.g. the index: a meta-refresh page that navigates on to the book's first page
    for attempt in range(3):
        try:
            result = browser.send("Runtime.evaluate", {"expression": PAGE_CHECK_JS, "awaitPromise": True, "returnByValue": True}, session=session)
            break
        except RuntimeError as exc:
            if "navigated" not in str(exc) or attempt == 2:
                raise
            _settle(browser, session)
    if "exceptionDetails" in result:
        raise RuntimeError(f"{page}: the in-page check failed: {result['exceptionDetails']}")
    record = dict(result["result"]["value"], page=page, seconds=0.0)
    browser.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush pending console events
    height = min(int(record["height"]), 6000)
    # A viewport as tall as the shot: capturing beyond a 900-px viewport lays wide pages out differently.
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    shot = browser.send(
        "Page.captureScreenshot",
        {"format": "png", "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}},
        session=session,
    )
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", page.removesuffix(".html")) + ".png"
    (out / name).write_bytes(base64.b64decode(shot["data"]))
    record["screenshot"] = name
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["console_errors"] = _console_errors(browser.events, session)
    browser.events = [e for e in browser.events if e.get("sessionId") != session]
    browser.send("Target.closeTarget", {"targetId": target})

    # --- the assertions ---
    if record["math_unrendered"] or record["mjx_errors"]:
        problems.append(f"{record['math_unrendered']} of {record['math_elements']} equations not rendered, {record['mjx_errors']} MathJax errors")
    if record["raw_tex"]:
        problems.append(f"raw TeX left in the text: {record['raw_tex']}")
    if page.startswith(MATH_PARTS) and not record["mjx_containers"]:
        problems.append("no rendered equation on a page of a paper's part")
    if record["math_elements"] and not record["mathjax_loaded"]:
        problems.append("MathJax did not load")
    if record["broken_images"]:
        problems.append(f"images that did not load: {record['broken_images']}")
    if record["error_outputs"] or record["stderr_tracebacks"]:
        problems.append(f"error outputs: {record['error_outputs']} error cells, {record['stderr_tracebacks']} tracebacks in stderr")
    if record["console_errors"]:
        problems.append(f"console errors: {record['console_errors']}")
    if page.startswith("notebooks/"):
        colab = [h for h in record["launch_links"] if "colab.research.google.com" in h]
        want = page.removesuffix(".html") + ".ipynb"
        if not colab:
            problems.append("no Colab launch button")
        elif not all(h.endswith("/" + want) for h in colab):
            problems.append(f"the Colab button does not open {want}: {colab}")
        elif not (repo / want).is_file():
            problems.append(f"the Colab button opens {want}, which is not in the repository")
    if any("mybinder.org" in h for h in record["launch_links"]):
        problems.append("a Binder launch button (Binder cannot build this book's environment)")
    problems += reader_problems(record, page, html)
    record["problems"] = problems
    return record


def png_dpi(path: Path) -> float | None:
    """Horizontal resolution from a PNG's pHYs chunk (matplotlib writes the figure's dpi there)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    at = data.find(b"pHYs")
    if data[:8] != b"\x89PNG\r\n\x1a\n" or at < 0:
        return None
    per_unit, unit = struct.unpack(">I", data[at + 4 : at + 8])[0], data[at + 12]
    return per_unit * 0.0254 if unit == 1 and per_unit else None


#: The text rules: the in-page measurement (PAGE_CHECK_JS) and what its hits mean to a reader.
TEXT_RULES = (
    ("dollars", "literal $ in the text"),
    ("output_tex", "TeX printed as text in an output"),
    ("md_tables", "raw Markdown table in the text"),
    ("numberless_refs", "cross-reference without a number or title"),
    ("unpublished", "reference to unpublished material"),
    ("reprs", "object repr in the page"),
)


def reader_problems(record: dict, page: str, html: Path | None) -> list[str]:
    """What a reader would see as broken: the page-check rules of issue 12 (each has a negative control
    in tests/test_browser.py)."""
    problems = [f"{message}: {record[key]}" for key, message in TEXT_RULES if record[key]]
    if record["page_width"] > record["viewport_width"] + 1:
        problems.append(f"page wider than its viewport: {record['page_width']} px > {record['viewport_width']} px")
    for fig in record["figures"]:
        if not (fig["captioned"] and fig["numbered"]):
            problems.append(f"figure without a numbered caption: {fig['src']}")
        if fig["natural"] and fig["shown"] and html is not None and fig["src"] and not fig["src"].startswith(("http:", "https:", "data:")):
            dpi = png_dpi((html / page).parent / fig["src"]) or 96.0
            # Text of size s pt in a figure saved at `dpi` is s*dpi/72 image pixels; shown at shown/natural
            # of its pixel size it is s*(dpi/96)*(shown/natural) CSS points.
            smallest = MIN_FONT_PT * dpi / 96.0 * fig["shown"] / fig["natural"]
            if smallest < READABLE_PT - 1e-9:
                problems.append(f"figure text {smallest:.1f} pt as displayed (< {READABLE_PT} pt): {fig['src']}")
    return problems


def toc_pages(root: Path = ROOT) -> list[str]:
    toc = root / "_toc.yml"
    return ["index.html"] + [f + ".html" for f in [toc_root(toc), *toc_files(toc)]]


SKIP_DIRS = ("_static", "_sources", "_images", "mathjax", "_downloads")


def built_pages(html: Path) -> list[str]:
    """Every HTML page of the build (the index first), relative to ``html``."""
    pages = sorted(
        str(p.relative_to(html)) for p in html.rglob("*.html") if not p.relative_to(html).parts[0] in SKIP_DIRS
    )
    return ["index.html"] + [p for p in pages if p != "index.html"]


def run(html: Path, pages: list[str], out: Path, chromium: str, repo: Path = ROOT) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    server, base_url = serve(html)
    profile = tempfile.mkdtemp(prefix="browser-check-")
    browser = Chromium(chromium, profile)
    try:
        browser.send("Target.setDiscoverTargets", {"discover": False})
        return [check_page(browser, base_url, page, out, repo, html) for page in pages]
    finally:
        browser.close()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*", help="pages relative to --html (default: index, one page per part, fork, results, performance)")
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--all", action="store_true", help="every built page (every .html of the build; each _toc.yml page must be among them)")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    if not (args.html / "index.html").is_file():
        print(f"no built book at {args.html}: run `make book` first", file=sys.stderr)
        return 2
    if not shutil.which(args.chromium):
        print(f"Chromium not found at {args.chromium}: apt-get install chromium (or set $CHROMIUM)", file=sys.stderr)
        return 2
    if args.all:
        pages = built_pages(args.html)
        missing = sorted(set(toc_pages()) - set(pages))
        if missing:
            print(f"pages of _toc.yml missing from the build: {missing}", file=sys.stderr)
            return 1
    else:
        pages = args.pages or [p for p in DEFAULT_PAGES if (args.html / p).is_file() or not p.startswith("book/")]
    start = time.perf_counter()
    records = run(args.html, pages, args.out, args.chromium)
    failed = [r for r in records if r["problems"]]
    print(f"{'page':<46} {'equations':>9} {'images':>7} {'console errors':>15} {'launch':>7} {'s':>6}  result")
    for r in records:
        launch = "colab" if any("colab" in h for h in r["launch_links"]) else "-"
        print(f"{r['page']:<46} {r['mjx_containers']:>9} {r['images'] - len(r['broken_images'])}/{r['images']:<5} "
              f"{len(r['console_errors']):>15} {launch:>7} {r['seconds']:>6.1f}  {'FAIL' if r['problems'] else 'ok'}")
        for problem in r["problems"]:
            print(f"    - {problem}")
    summary = {
        "pages": len(records), "failed": len(failed), "seconds": round(time.perf_counter() - start, 1),
        "equations": sum(r["mjx_containers"] for r in records), "images": sum(r["images"] for r in records),
        "console_errors": sum(len(r["console_errors"]) for r in records), "records": records,
    }
    (args.out / "report.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(records)} pages, {summary['equations']} rendered equations, {summary['images']} images, "
          f"{summary['console_errors']} console errors, {len(failed)} failing; screenshots in {args.out} ({summary['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
