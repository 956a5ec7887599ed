"""report.html in a real headless Chromium: it renders offline, every section is there, every figure decodes.

Needs the `playwright` Python package and a system Chromium (Debian: `apt-get install chromium`);
`playwright install` is never needed: the test points playwright at the system browser. Skips with
the reason when either is missing. `PREFTUNE_CHROMIUM` overrides the browser path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from preftune.eval.html_report import build_report
from tests.synthetic_run import SECTIONS, write_synthetic_run

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    candidates = [os.environ.get("PREFTUNE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system Chromium (Debian/Ubuntu: apt-get install chromium; or set PREFTUNE_CHROMIUM)")


def test_report_renders_in_headless_chromium(tmp_path):
    executable = _chromium()
    run_dir = write_synthetic_run(tmp_path / "run")
    page_path = build_report(run_dir).html

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console_errors, page_errors, requests = [], [], []
            page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")

            headings = page.eval_on_selector_all("h2", "nodes => nodes.map(n => n.textContent)")
            images = page.eval_on_selector_all(
                "img", "nodes => nodes.map(n => ({complete: n.complete, width: n.naturalWidth, height: n.naturalHeight}))"
            )
            title = page.title()
            # The generations table as the browser shows it: a model's <script> and Markdown are text, not markup.
            generation_cells = page.eval_on_selector_all(
                "section:has(h2:text-is('Generations, before → after')) td", "nodes => nodes.map(n => n.textContent)"
            )
            scripts = page.eval_on_selector_all("script", "nodes => nodes.length")
        finally:
            browser.close()

    assert title == "preftune run: cpo on tiny-test-model"
    assert headings == SECTIONS
    assert len(images) == 3
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in images)
    assert console_errors == [] and page_errors == []
    assert scripts == 0
    assert generation_cells[3] == "Sure! <script>alert('x')</script> [click](javascript:alert(1)) **now** ↵ step 1 | 2 …"
    # Only the page itself and its data: URIs; nothing fetched from anywhere else.
    assert all(url == page_path.as_uri() or url.startswith("data:") for url in requests), requests
