"""The page at ``/`` in a real browser: Debian's chromium, headless, driven by selenium
through Debian's chromedriver (nothing downloads a browser), against a real
``python -m service`` serving the bundled model with an API key."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.data import synthetic_sample
from service.budget import MIB
from tests.service.conftest import ServerProcess, until

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all

KEY = "page-test-key"
UPLOAD_LIMIT = 2 * MIB


def _wait(driver, css: str, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


@pytest.mark.real_part("chromium")
def test_page_segments_an_image_and_shows_the_servers_errors(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server = ServerProcess(None, tmp_path, CHANSEG_API_KEY=KEY, CHANSEG_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/").status_code == 200  # open, like /docs: no key needed
        browser.get(server.url + "/")

        # Without the key the page says what the server said, and asks for it.
        model_line = browser.find_element(By.ID, "model")
        _wait(browser, "#model")
        browser.implicitly_wait(0)
        until(lambda: "401" in model_line.text, "the page never showed the 401")
        assert "API key" in model_line.text
        key = browser.find_element(By.ID, "api-key")
        key.send_keys(KEY, Keys.TAB)  # the change event reloads the model's description
        until(lambda: "Model chanseg" in model_line.text, f"no model description: {model_line.text!r}")
        legend = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
        assert legend == ["background", "circle", "rectangle", "triangle"]

        # An image in, its overlay, fractions equal to the JSON API's, the server's timings.
        pixels = synthetic_sample(5, 0, (384, 512)).image  # all three shapes
        photo = tmp_path / "shapes.png"
        Image.fromarray(pixels).save(photo)
        browser.find_element(By.ID, "files").send_keys(str(photo))
        card = _wait(browser, "article.result[data-state]")
        assert card.get_attribute("data-state") == "done", card.text
        api = httpx.post(
            server.url + "/predict", files={"file": ("shapes.png", photo.read_bytes(), "image/png")},
            headers={"X-API-Key": KEY}, timeout=60,
        ).json()["predictions"][0]  # fmt: skip
        shown = {
            row.get_attribute("data-class"): row.find_element(By.CSS_SELECTOR, "td.fraction")
            for row in card.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert set(shown) == set(api["class_fractions"])
        for name, cell in shown.items():
            assert float(cell.get_attribute("data-value")) == api["class_fractions"][name]
            assert cell.text == f"{100 * api['class_fractions'][name]:.2f} %"
        assert 1 - api["class_fractions"]["background"] > 0.05
        canvas = card.find_element(By.CSS_SELECTOR, "canvas")
        assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("512", "384")
        drawn = browser.execute_script("return arguments[0].toDataURL('image/png')", canvas)
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(drawn.split(",", 1)[1]))).convert("RGB"))
        tinted = (drawn != pixels).any(-1)  # where the overlay changed the photo
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(api["mask_png"]))))
        assert (tinted == (mask != 0)).mean() > 0.99  # every class but background, and nothing else
        assert float(card.find_element(By.CSS_SELECTOR, "dd.inference").text.split()[0]) > 0
        assert card.find_element(By.CSS_SELECTOR, "dd.batch").text == "1"
        link = card.find_element(By.LINK_TEXT, "Download the mask PNG")
        assert link.get_attribute("download") == "shapes-mask.png"
        assert link.get_attribute("href").removeprefix("data:image/png;base64,") == api["mask_png"]
        _screenshot(browser, tmp_path)

        # Too large: the server's 413 message, shown as an alert.
        big = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(big)
        assert big.stat().st_size > UPLOAD_LIMIT
        browser.find_element(By.ID, "files").send_keys(str(big))
        error = _wait(browser, "article.result[data-file='big.png'][data-state='error'] .error")
        assert error.get_attribute("role") == "alert"
        assert error.text.startswith("413: ") and f"over the limit of {UPLOAD_LIMIT}" in error.text

        # Not an image: the server's 400 and its words, in this file's own card.
        text = tmp_path / "notes.png"
        text.write_text("not an image at all")
        browser.find_element(By.ID, "files").send_keys(str(text))
        error = _wait(browser, "article.result[data-file='notes.png'][data-state='error'] .error")
        assert error.text.startswith("400: ") and "notes.png" in error.text
        assert len(browser.find_elements(By.CSS_SELECTOR, "article.result[data-state='done']")) == 1
    finally:
        server.stop()


def _screenshot(browser, tmp_path: Path) -> None:
    """The page with a result: checked here, kept in docs/ when CHANSEG_SCREENSHOT names a file."""
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert (
            image.size[0] >= 1000 and len(image.getcolors(1 << 20) or []) > 50
        )  # a rendered page, not blank
        if os.environ.get("CHANSEG_SCREENSHOT"):  # 256 colours: a third of the bytes, the same picture
            image.convert("RGB").quantize(256).save(os.environ["CHANSEG_SCREENSHOT"], optimize=True)


@pytest.mark.real_part("chromium")
def test_the_api_pages_render_with_nothing_fetched_from_elsewhere(browser, tiny_artifact, tmp_path):
    """Issue 31: /docs and /redoc loaded their scripts from a CDN (no integrity check; a
    blank page on a cluster with no way out). Their assets come from the server now; the
    browser is allowed to reach nothing else."""
    server = ServerProcess(tiny_artifact, tmp_path, CHANSEG_API_KEY=KEY)
    try:
        server.wait_ready()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["https://*", "*cdn*", "*googleapis*"]})
        browser.get(server.url + "/docs")
        title = _wait(browser, ".swagger-ui .info .title")
        assert title.text.startswith("chanseg")
        assert _wait(browser, ".opblock-summary-path[data-path='/predict']")
        browser.get(server.url + "/redoc")
        assert "chanseg" in _wait(browser, "redoc h1, .api-info h1", timeout=60).text
        html = httpx.get(server.url + "/docs").text + httpx.get(server.url + "/redoc").text
        assert "/docs/assets/swagger-ui-bundle.js" in html and "/docs/assets/redoc.standalone.js" in html
        assert "cdn." not in html and "https://" not in html
    finally:
        server.stop()
