"""The page at ``/``, in a real browser: headless Chromium driven by selenium through the
system's chromedriver (never a downloaded one). It types a prompt, waits for the streamed
answer, and checks that the tokens, their shading and their top-5 tooltips appear, and
that the tokens are exactly the API's.

``MINIGPT_PAGE_SCREENSHOT=docs/serving.png`` saves a screenshot of the page there (how
the documentation's picture is made, with ``MINIGPT_PAGE_MODEL`` naming a trained model
to serve instead of random weights); otherwise nothing is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives a browser with selenium")
pytest.importorskip("uvicorn", reason="the server runs on uvicorn (pip install 'minigpt[serve]')")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from minigpt.models.gpt2.model import GPTModel  # noqa: E402
from minigpt.serving import Engine, create_app  # noqa: E402
from minigpt.serving.server import BackgroundServer  # noqa: E402
from minigpt.serving.settings import ServeConfig, load_engine  # noqa: E402
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Chromium and chromedriver (Debian: apt install chromium chromium-driver)")
CFG = dict(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    engine = Engine(GPTModel(CFG), get_gpt2_tokenizer(), name="tiny-page")
    if os.environ.get("MINIGPT_PAGE_MODEL"):  # a trained model makes a more telling screenshot
        engine = load_engine(ServeConfig(model=os.environ["MINIGPT_PAGE_MODEL"], name="tiny-page", device="cpu"))
    with BackgroundServer(create_app(engine)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,800", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    # The system's driver, named explicitly: selenium then never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def finished(browser, timeout: float = 60):
    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.ID, "output").get_attribute("data-state") == "done")


def hover_tooltip(browser, token) -> list[tuple[str, float]]:
    """Hover ``token``; the tooltip's rows as ``(token, percent)``."""
    ActionChains(browser).move_to_element(token).perform()
    tip = WebDriverWait(browser, 10).until(ec.visibility_of_element_located((By.ID, "tip")))
    rows = [row.find_elements(By.TAG_NAME, "td") for row in tip.find_elements(By.TAG_NAME, "tr")]
    return [(cells[0].text, float(cells[1].text.rstrip("%"))) for cells in rows]


def test_completion_shows_tokens_with_probabilities_and_top5(server, browser, one_thread):
    browser.get(server.base_url + "/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "model-name"), "tiny-page"))
    browser.find_element(By.ID, "mode-complete").click()
    tokens_box = browser.find_element(By.ID, "max-tokens")
    tokens_box.clear()
    tokens_box.send_keys("40")
    browser.find_element(By.ID, "prompt").send_keys("Every effort moves you")
    browser.find_element(By.ID, "send").click()
    finished(browser)

    assert "finished" in browser.find_element(By.ID, "status").text
    tokens = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
    assert 1 <= len(tokens) <= 40
    assert all(0 < float(t.get_attribute("data-prob")) <= 1 for t in tokens)
    assert all(t.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "") for t in tokens)
    rows = hover_tooltip(browser, min(tokens, key=lambda t: float(t.get_attribute("data-prob"))))  # the surprise
    assert len(rows) == 5
    assert [p for _, p in rows] == sorted((p for _, p in rows), reverse=True) and sum(p for _, p in rows) <= 100.5

    screenshot = os.environ.get("MINIGPT_PAGE_SCREENSHOT")
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(screenshot)


def test_chat_streams_an_answer_and_keeps_the_turns(server, browser, one_thread):
    browser.get(server.base_url + "/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "model-name"), "tiny-page"))
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("Hello, who are you?")
    box.send_keys("\n")  # Enter sends
    finished(browser)
    assert browser.find_element(By.CSS_SELECTOR, "#output .turn.user").text.endswith("Hello, who are you?")
    answer = browser.find_elements(By.CSS_SELECTOR, "#output .turn.assistant .tok")
    assert answer, "the answer has no tokens"
    rows = hover_tooltip(browser, answer[-1])
    assert len(rows) == 5 and all(0 <= p <= 100 for _, p in rows)
