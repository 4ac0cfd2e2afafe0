"""The demo's reports in a real browser (headless Chromium from Debian's packages, driven by selenium): no console
error, every image loaded, the highlighted row is the chosen step (or winning recipe), every link resolves, and a
full-page screenshot of each page in the test's temporary folder.

    REPORT_SCREENSHOTS=assets .venv/bin/python -m pytest tests/test_report_browser.py -k run_report

also writes the README's picture of the demo's run report (assets/run_report.png, made small).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image

from libs.train_output import META_FILE
from tools.demo import run_demo

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run "
           "installs them) and selenium (pip install -r requirements-dev.txt)")
README_PICTURE = "run_report.png"
README_WIDTH = 900  # pixels of the README's picture (kept well under 400 KB)

pytestmark = pytest.mark.slow


def _browser_missing() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return True
    return not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file())


@pytest.fixture(scope="module")
def browser():
    if _browser_missing():
        pytest.skip(INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's run: with REPORT_SCREENSHOTS, `make demo` as it runs by default (30 steps, validated every 10:
    the README's picture); else the same three validated steps in 6 steps (what the page checks need)."""
    if _browser_missing():
        pytest.skip(INSTALL)
    short = {} if os.environ.get("REPORT_SCREENSHOTS") else {"train_step": 6, "validation_steps": 2}
    return run_demo(tmp_path_factory.mktemp("demo") / "demo_run", **short)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`make demo-search`, shorter: three recipes of 4 steps, validated every 2."""
    if _browser_missing():
        pytest.skip(INSTALL)
    return run_demo(tmp_path_factory.mktemp("search") / "demo_search", train_step=4, validation_steps=2,
                    auto_recipe=True)


def open_page(driver, page: Path, screenshot: Path) -> None:
    """Load `page` from file://, check it, and save a full-page screenshot to `screenshot`."""
    assert page.is_file(), page
    driver.get(page.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    assert broken == [], broken
    assert driver.execute_script("return document.images.length") > 0
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
    for url in driver.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
        parsed = urlparse(url)
        assert parsed.scheme == "file" and Path(unquote(parsed.path)).is_file(), url
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    with Image.open(screenshot) as image:
        assert image.size[1] >= size["height"] - 1  # the whole page, not the window


def highlighted(driver, css: str) -> list[str]:
    return driver.execute_script(
        f"return Array.from(document.querySelectorAll('table.{css} tr.chosen')).map(r => r.cells[0].textContent)")


def test_run_report_in_the_browser(browser, demo, tmp_path):
    page = demo["run report"]
    open_page(browser, page, tmp_path / "run_report.png")
    selection = json.loads((demo["personalization"] / META_FILE).read_text())["selection"]
    assert len(selection["scores"]) >= 3
    assert highlighted(browser, "selection") == [str(selection["chosen_step"])]
    target = os.environ.get("REPORT_SCREENSHOTS")
    if target:
        with Image.open(tmp_path / "run_report.png") as image:
            small = image.convert("RGB").resize((README_WIDTH, round(image.height * README_WIDTH / image.width)),
                                                Image.LANCZOS)
            small.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(Path(target) / README_PICTURE, optimize=True)
        assert (Path(target) / README_PICTURE).stat().st_size < 400_000


def test_score_report_in_the_browser(browser, demo, tmp_path):
    open_page(browser, demo["report"], tmp_path / "score_report.png")
    links = browser.execute_script("return Array.from(document.querySelectorAll('table.training a')).map(a => a.href)")
    assert links == [demo["run report"].as_uri()]


def test_search_report_in_the_browser(browser, search, tmp_path):
    page = search["search report"]
    open_page(browser, page, tmp_path / "search_report.png")
    winner = json.loads((search["personalization"] / META_FILE).read_text())["auto_recipe"]["winner"]
    assert highlighted(browser, "recipes") == [winner]
    for recipe in ("base", "half_rank", "double_lr"):  # each recipe's run report opens as well
        open_page(browser, page.parent / recipe / "report.html", tmp_path / f"{recipe}.png")
    open_page(browser, search["report"], tmp_path / "search_score_report.png")
    links = browser.execute_script("return Array.from(document.querySelectorAll('table.training a')).map(a => a.href)")
    assert links == [page.as_uri()]  # a searched subject's training is its search
