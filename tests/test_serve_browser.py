"""The search page in real headless Chromium (selenium): upload an image, see its hits, click one to search by its
key, filter by label, and a text query on a CLIP-space index. Skips when chromium / chromedriver are absent.

`VITSSL_SCREENSHOT=docs/serve.png` saves the page with an image query's hits (the README's picture)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from test_serve import DIGITS, running, shard_sample, tiny_backbone, tiny_clip

from downstream.search import build_index
from downstream.serve_app import create_app

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium and chromedriver are not installed (Debian: apt-get install -y chromium "
                "chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

K = 12


@pytest.fixture(scope="module")
def site(_digits_shards_once, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    shards = _digits_shards_once
    build_index(tiny_backbone(root / "backbone"), str(shards), root / "digits")
    build_index(tiny_clip(root / "clip-export"), str(shards / "shard-000000.tar"), root / "clip", space="clip")
    with running(create_app([root / "digits", root / "clip"], poll_s=0)) as url:
        yield {"url": url, "root": root, "shards": shards}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1180,800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land in the console
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def hits(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#grid .hit')].map(c => ({
            key: c.dataset.key, score: c.querySelector('.score').textContent,
            label: c.querySelector('.label').textContent, caption: c.querySelector('.caption').textContent,
            thumb: c.querySelector('img') ? c.querySelector('img').naturalWidth : 0}));""")


def wait_for(driver, condition, what: str, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def status_after(driver, before: str) -> str:
    return wait_for(driver, lambda d: (s := d.find_element(By.ID, "status").text) != before and
                    "searching" not in s and s, "the search did not finish")


def assert_no_policy_violations(driver) -> None:
    """The page's inline script and style run under its CSP (allowed by their hashes, no 'unsafe-inline')."""
    violations = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations, violations


def api_keys(url: str, index: str, **body) -> list[str]:
    r = httpx.post(f"{url}/search", params={"index": index}, json=body)
    assert r.status_code == 200, r.text
    return [h["key"] for h in r.json()["hits"]]


def test_image_upload_then_click_a_hit_then_filter_by_label(site, browser):
    url = site["url"]
    key, png = shard_sample(site["shards"], "shard-000001.tar", site["root"] / "query.png")
    browser.get(url)
    wait_for(browser, lambda d: "1,797 items" in d.find_element(By.ID, "meta").text, "the index info did not load")
    assert not browser.find_element(By.ID, "textform").is_displayed()  # no text box: not a CLIP-space index
    assert browser.find_element(By.ID, "k").get_attribute("value") == str(K)  # the page's default
    browser.find_element(By.ID, "file").send_keys(str(png))
    status = status_after(browser, "")
    assert f"{K} hits for query.png" in status
    shown = wait_for(browser, lambda d: (h := hits(d)) and all(x["thumb"] > 0 for x in h) and h,
                     "the hits' thumbnails did not load")
    assert len(shown) == K and shown[0]["key"] == key and shown[0]["score"] == "1.000"
    assert all(h["label"] in DIGITS and h["caption"].startswith("a handwritten digit") for h in shown)
    if os.environ.get("VITSSL_SCREENSHOT"):
        Path(os.environ["VITSSL_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(os.environ["VITSSL_SCREENSHOT"])

    clicked = shown[2]["key"]  # its neighbours, itself left out, as the API gives them
    browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[2].click()
    assert f"hits for key {clicked}" in status_after(browser, status)
    neighbours = [h["key"] for h in hits(browser)]
    assert clicked not in neighbours and neighbours == api_keys(url, "digits", key=clicked, k=K)

    status = browser.find_element(By.ID, "status").text
    Select(browser.find_element(By.ID, "label")).select_by_value("7")
    status_after(browser, status)
    filtered = hits(browser)
    assert len(filtered) == K and {h["label"] for h in filtered} == {"seven"}
    assert [h["key"] for h in filtered] == api_keys(url, "digits", key=clicked, k=K, label=7)
    assert_no_policy_violations(browser)


def test_text_query_on_a_clip_index(site, browser):
    url = site["url"]
    browser.get(f"{url}/?index=clip")
    wait_for(browser, lambda d: d.find_element(By.ID, "meta").text.startswith("clip: 450 items, clip space"),
             "the CLIP index's info did not load")
    box = browser.find_element(By.ID, "text")
    assert box.is_displayed()
    box.send_keys("a handwritten digit three")
    browser.find_element(By.ID, "textgo").click()
    assert "hits for “a handwritten digit three”" in status_after(browser, "")
    assert [h["key"] for h in hits(browser)] == api_keys(url, "clip", text="a handwritten digit three", k=K)
    assert_no_policy_violations(browser)
