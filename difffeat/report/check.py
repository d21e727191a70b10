"""Checks that a written report page shows what it should: every picture embedded and decodable, and — where
Chromium is installed — that the page loads in a real browser with no console message and every picture drawn.

    python -m difffeat.report.check report.html      # prints the findings; exit 1 on a problem
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# Run inside the page copy Chromium loads: after load, list every <img> with whether the browser decoded it.
_PROBE = ("addEventListener('load',function(){var r=[];document.querySelectorAll('img').forEach(function(i){"
          "r.push([i.alt,i.complete&&i.naturalWidth>0])});var p=document.createElement('pre');p.id='difffeat-check';"
          "p.textContent=JSON.stringify(r);document.body.appendChild(p)});")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, str]] = []  # (alt, src)
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs.get("alt") or "", attrs.get("src") or ""))
        elif tag == "script":
            self.scripts += 1


def check_static(path: str | os.PathLike) -> dict:
    """Parse the page (html.parser) and decode every embedded picture (Pillow): {"images", "problems"}."""
    from PIL import Image

    parser = _Images()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    problems = [f"the page holds {parser.scripts} <script> element(s)"] if parser.scripts else []
    prefix = "data:image/png;base64,"
    for i, (alt, src) in enumerate(parser.images):
        if not src.startswith(prefix):
            problems.append(f"image {i} ({alt!r}) is not an embedded PNG: {src[:40]!r}")
            continue
        try:
            with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True))) as im:
                im.load()
                if min(im.size) < 1:
                    problems.append(f"image {i} ({alt!r}) is empty")
        except (binascii.Error, ValueError, OSError) as e:
            problems.append(f"image {i} ({alt!r}) does not decode: {e}")
    return {"images": len(parser.images), "problems": problems}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check_in_chromium(path: str | os.PathLike, chromium: str | None = None, timeout: float = 120) -> dict:
    """Load the page in headless Chromium: {"loaded", "images", "broken", "console"}.

    A copy of the page gets a small probe script (allowed by its hash in the page's own policy, which is otherwise
    left as it is), and Chromium's DOM after load and its console log are read back.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH")
    page = Path(path).read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(_PROBE.encode()).digest()).decode()
    page, n = re.subn(r"(Content-Security-Policy' content=\"[^\"]*)\"",
                      lambda m: f"{m[1]}; script-src 'sha256-{digest}'\"", page, count=1)
    probe = f"<script>{_PROBE}</script>"
    page = page.replace("</head>", probe + "</head>", 1) if "</head>" in page else probe + page
    with tempfile.TemporaryDirectory(prefix="difffeat-check-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(page, encoding="utf-8")
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp}/profile", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
             "--dump-dom", copy.as_uri()],
            capture_output=True, text=True, timeout=timeout)
    found = re.search(r"<pre id=\"difffeat-check\">(.*?)</pre>", result.stdout, re.S)
    console = [line for line in result.stderr.splitlines() if re.search(r"CONSOLE[:(]", line)]
    if not found:
        return {"loaded": False, "images": 0, "broken": [], "console": console, "csp_patched": bool(n),
                "stderr_tail": result.stderr[-2000:]}
    import html

    images = json.loads(html.unescape(found[1]))
    return {"loaded": True, "images": len(images), "broken": [alt for alt, ok in images if not ok],
            "console": console, "csp_patched": bool(n)}


def check_report(path: str | os.PathLike, browser: bool = True) -> dict:
    """Both checks where they can run: {"images", "problems", "browser"}; `browser` is the Chromium used (None
    when it is not installed or not asked for), and every finding is one line in `problems`."""
    static = check_static(path)
    problems = list(static["problems"])
    chromium = find_chromium() if browser else None
    if chromium:
        seen = check_in_chromium(path, chromium)
        if not seen["loaded"]:
            problems.append("chromium did not finish loading the page: " + seen.get("stderr_tail", "")[-300:])
        problems += [f"chromium could not draw image {alt!r}" for alt in seen["broken"]]
        problems += [f"chromium console: {line}" for line in seen["console"]]
        if seen["loaded"] and seen["images"] != static["images"]:
            problems.append(f"chromium sees {seen['images']} images, the HTML holds {static['images']}")
    return {"images": static["images"], "problems": problems, "browser": chromium}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m difffeat.report.check REPORT.html", file=sys.stderr)
        return 2
    found = check_report(argv[0])
    print(f"{found['images']} embedded images; checked by parsing" + (f" and in {found['browser']}" if found["browser"]
                                                                     else " (no chromium on PATH)"))
    for line in found["problems"]:
        print(f"  problem: {line}")
    return 1 if found["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
