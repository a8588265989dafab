"""Open every generated report in real headless Chromium (Debian package, never a download).

Fails on console errors, page errors and failed requests (a broken image link is one);
checks the image grid and the trend charts render; saves screenshots to artifacts/.
"""

from __future__ import annotations

import shutil

import pytest

from reports import write_reports
from tests.reports_fixtures import build_run, castbook_home, standard_characters, standard_items  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("castbook_home")]
ARTIFACTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("!!! BROWSER TESTS SKIPPED: Debian `chromium` is not installed; run `make browser` "
                    "(apt-get install chromium) — the HTML reports were NOT checked in a real browser !!!")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("!!! BROWSER TESTS SKIPPED: python package `playwright` is not installed (pip install -e '.[dev]') !!!")
    return exe, sync_playwright


@pytest.fixture(scope="module")
def runs(tmp_path_factory, castbook_home):
    base = tmp_path_factory.mktemp("browser")
    root = base / "proj"
    chars = standard_characters(root)
    out = []
    for rid, slow in [("20261128T000000Z-b", 0.4), ("20261129T000000Z-b", 0.5), ("20261130T000000Z-b", 0.7)]:
        run_dir = build_run(base / "runs", rid, root, standard_items(slow), chars)
        out.append(write_reports(run_dir))
    return out


def test_reports_render_cleanly_in_chromium(chromium, runs, tmp_path):
    exe, sync_playwright = chromium
    paths = runs[-1]
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        # --user-data-dir goes through launch_persistent_context: playwright refuses it in `args`.
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=exe, headless=True,
                                                   args=FLAGS, viewport={"width": 1300, "height": 900})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"requestfailed: {r.url}"))
            for name in ("report", "consistency", "benchmark", "diff", "index"):
                page.goto(paths[name].as_uri())
                # Thumbnails are lazy: load them all so a broken link cannot hide below the fold.
                page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
                page.wait_for_function("Array.from(document.images).every(i => i.complete)")
                broken = page.evaluate("Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.src)")
                assert broken == [], f"{name}: broken images {broken}"
                assert page.title().endswith("castbook")
                if name == "consistency":
                    assert page.locator(".tile img").count() >= 10
                    assert page.locator(".tile.pass").count() > 0 and page.locator(".tile.fail").count() > 0
                    # The filter script runs: failures only hides passing tiles.
                    n_fail = int(page.locator("#failures-count").inner_text())
                    assert n_fail > 0
                    page.check("#failures-only")
                    assert page.locator(".tile.pass:visible").count() == 0
                    assert page.locator(".tile.fail:visible").count() > 0
                    # Escaped spec strings appear as text, never as live markup.
                    assert page.locator("img[src='x']").count() == 0
                    page.uncheck("#failures-only")
                if name == "benchmark":
                    assert page.locator("svg.chart").count() >= 3
                    assert page.locator("svg.chart[data-metric='mean_s_per_image'] circle").count() == 3
                    box = page.locator("svg.chart").first.bounding_box()
                    assert box and box["width"] > 200 and box["height"] > 100
                if name == "index":
                    assert page.locator("#runs tr[data-run]").count() == 3
                    assert page.locator("#trends svg.chart").count() == 2  # luca and mia
                    assert page.locator("#trends svg.chart circle").count() == 6
                    page.click("#runs tr[data-run] a")  # newest run's report opens from the index
                    assert page.title().startswith("Summary")
                    page.go_back()
                page.screenshot(path=str(ARTIFACTS / f"report-{name}.png"), full_page=True)
        finally:
            ctx.close()
    assert problems == []
