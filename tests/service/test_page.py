"""The page at / in a real headless Chromium (Debian's chromium and chromium-driver, installed by
``make browser``; nothing is downloaded), on a phone-sized window, against a real server process:
upload a Fashion-MNIST image, see the top label, the heatmap and the model's facts; upload a
broken file, see the server's error. A screenshot is saved (``PAGE_SCREENSHOT`` names where; the
README's is made so)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import png_bytes
from training.data import ImageSet

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert Path(CHROMIUM).exists() and Path(DRIVER).exists(), (
        "Chromium and its driver are needed: `make browser` installs Debian's")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=390,1400"):  # a phone's width
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def upload(driver: WebDriver, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))


def test_the_page_classifies_an_uploaded_image_and_shows_why(
        browser: WebDriver, shared_server: int, fmnist_test: ImageSet, tmp_path: Path) -> None:
    index = int((fmnist_test.labels == 1).nonzero()[0][0])  # a trouser
    image = tmp_path / "trouser.png"
    image.write_bytes(png_bytes(fmnist_test.images[index, 0].numpy()))
    browser.get(f"http://127.0.0.1:{shared_server}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    info = browser.find_element(By.ID, "info").text
    assert "fashion_mnist_seed_cnn" in info and "92.44%" in info and "CPUExecutionProvider" in info

    upload(browser, image)
    wait.until(ec.visibility_of_element_located((By.ID, "answer")))
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .label")]
    assert labels[0] == "Trouser" and len(labels) == 5
    assert browser.execute_script(
        "const i = document.getElementById('heat'); return i.complete && i.naturalWidth") >= 224
    assert "Trouser" in browser.find_element(By.ID, "heatcap").text
    assert not browser.find_element(By.ID, "error").is_displayed()
    # Fits a phone: nothing wider than the window.
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth")
    shot = Path(os.environ.get("PAGE_SCREENSHOT", tmp_path / "page.png"))
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as saved:
        assert saved.format == "PNG" and saved.width >= 300

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    upload(browser, broken)
    error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert error.text.startswith("400") and "image" in error.text


def test_the_page_is_served_with_a_strict_policy(shared_server: int) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{shared_server}/") as resp:
        body = resp.read().decode()
        policy = resp.headers["content-security-policy"]
    assert resp.status == 200 and "<title>imgserve</title>" in body
    assert "connect-src 'self'" in policy
    assert "http://" not in body and "https://" not in body  # nothing fetched from elsewhere
