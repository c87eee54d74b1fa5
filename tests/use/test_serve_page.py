"""The chat page served at / (talm/use/page/chat.html), driven in a real headless Chromium with selenium: a
conversation whose replies are the API's for the whole conversation so far, Stop, and an error shown.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skipped, saying so, without them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import endless_chat_model_dir

pytest.importorskip("fastapi", reason="the talm[serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="the dev dependency selenium is not installed")

from test_serve import CONTEXT, NAME, Live, greedy_reply, serving  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver), as .ci/run does",
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    model_dir = endless_chat_model_dir(tmp_path_factory.mktemp("page") / "models" / NAME, context=CONTEXT)
    with serving(model_dir, NAME) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=900,700",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(browser: webdriver.Chrome, script: str, timeout: float = 60) -> object:
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := browser.execute_script(f"return {script}")):
        assert time.monotonic() < deadline, f"timed out waiting for: {script}"
        time.sleep(0.05)
    return value


def replies(browser: webdriver.Chrome) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('.message.assistant')].map(e => e.textContent)"
    )


def send(browser: webdriver.Chrome, text: str) -> None:
    """Type `text` and press Enter, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def set_field(browser: webdriver.Chrome, field: str, value: str) -> None:
    browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, value)


def test_a_conversation_on_the_page(live: Live, browser: webdriver.Chrome, tmp_path: Path) -> None:
    browser.get(live.url + "/")
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "8")

    send(browser, "Hello")
    wait_for(
        browser,
        "document.querySelectorAll('.message.assistant').length === 1 && document.body.dataset.busy === 'false'",
    )
    first = greedy_reply(live, [{"role": "user", "content": "Hello"}], 8)
    assert replies(browser) == [first] and first

    send(browser, "How are you?")
    wait_for(
        browser,
        "document.querySelectorAll('.message.assistant').length === 2 && document.body.dataset.busy === 'false'",
    )
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "How are you?"},
    ]
    assert replies(browser) == [
        first,
        greedy_reply(live, conversation, 8),
    ]  # the page sent the whole conversation
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 5_000


def test_stop_ends_the_reply_and_its_generation(live: Live, browser: webdriver.Chrome) -> None:
    browser.get(live.url + "/")
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    set_field(browser, "temperature", "0")  # max tokens unset: the rest of the context, thousands of tokens
    before = live.server.tokens_generated
    send(browser, "Tell me everything")
    wait_for(browser, "(document.querySelector('.message.assistant') || {}).textContent.length > 20")
    browser.execute_script("document.getElementById('stop').click()")
    wait_for(browser, "document.body.dataset.busy === 'false'")
    assert browser.execute_script("return document.getElementById('status').textContent") == "stopped"
    shown = replies(browser)[0]

    deadline = time.monotonic() + 30
    last = -1
    while (count := live.server.tokens_generated) != last:  # until it stops growing
        assert time.monotonic() < deadline, "generation went on after Stop"
        last = count
        time.sleep(0.5)
    assert count - before < CONTEXT // 2  # far from the reply's budget
    assert replies(browser)[0] == shown


def test_an_error_is_shown_and_the_message_given_back(live: Live, browser: webdriver.Chrome) -> None:
    browser.get(live.url + "/")
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    set_field(browser, "max-tokens", str(CONTEXT + 1))
    send(browser, "Hello")
    status = wait_for(browser, "document.getElementById('status').textContent")
    assert "more than the model's context" in status
    assert replies(browser) == []
    assert browser.execute_script("return document.getElementById('input').value") == "Hello"


def test_a_conversation_that_outgrows_the_context_leaves_its_oldest_exchange_out(
    live: Live, browser: webdriver.Chrome
) -> None:
    browser.get(live.url + "/")
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "4")
    long_one, long_two = (
        "one " * 2000,
        "a " * 2090,
    )  # ~2000 and ~2090 tokens: each fits the context alone, not both

    def send_long(text: str, replies_then: int) -> None:
        set_field(browser, "input", text)
        send(browser, "x")  # the typed x ends the message, Enter sends it
        wait_for(
            browser,
            f"document.querySelectorAll('.message.assistant').length === {replies_then} "
            "&& document.body.dataset.busy === 'false'",
        )

    send_long(long_one, 1)
    send_long(long_two, 2)
    assert "left out" in browser.execute_script("return document.getElementById('status').textContent")
    alone = greedy_reply(live, [{"role": "user", "content": long_two + "x"}], 4)
    assert replies(browser)[1] == alone  # the reply to the second message without the first exchange
