"""A headless-Chromium screenshot of a report page, for the benchmarks and the tests (not part of the
package: it needs playwright and a browser)."""
from __future__ import annotations

from pathlib import Path


def screenshot(page: str | Path, png: str | Path, browser: str = "/usr/bin/chromium") -> list[str]:
    """Open `page` in headless Chromium (Playwright), save a full-page PNG, and return the console
    errors and page errors seen while it loaded (an empty list for a clean page)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(browser), args=args, headless=True)
        try:
            tab = b.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(Path(page).resolve().as_uri())
            tab.wait_for_load_state("load")
            tab.screenshot(path=str(png), full_page=True)
        finally:
            b.close()
    return errors
