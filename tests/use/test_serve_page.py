"""The chat page served at / (talm/use/page/chat.html), driven in a real headless Chromium with selenium: a
conversation whose replies are the API's for the whole conversation so far, a reply cut at its limit said so,
Stop, errors shown (a server gone: "cannot reach the server"), the conversation and settings kept across a
reload, and markdown rendered without ever running HTML from a reply.

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
    """The replies' text as the API gave it (the page shows it rendered as markdown)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('.message.assistant')].map(e => e.dataset.text)"
    )


def open_page(browser: webdriver.Chrome, live: Live) -> None:
    """The chat page, fresh: nothing kept from an earlier test's conversation."""
    browser.get(live.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(live.url + "/")
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")


def status(browser: webdriver.Chrome) -> str:
    return browser.execute_script("return document.getElementById('status').textContent")


def wait_until_replied(browser: webdriver.Chrome, count: int) -> None:
    wait_for(
        browser,
        f"document.querySelectorAll('.message.assistant').length === {count} "
        "&& document.body.dataset.busy === 'false'",
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
    open_page(browser, live)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "8")

    send(browser, "Hello")
    wait_for(
        browser,
        "document.querySelectorAll('.message.assistant').length === 1 && document.body.dataset.busy === 'false'",
    )
    first = greedy_reply(live, [{"role": "user", "content": "Hello"}], 8)
    assert replies(browser) == [first] and first
    # this model never ends a reply by itself: it reached Max tokens, and the page says so, as `chat` does
    assert "the reply reached Max tokens (8)" in status(browser)

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
    open_page(browser, live)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(CONTEXT - 100))  # thousands of tokens
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
    open_page(browser, live)
    set_field(browser, "max-tokens", str(CONTEXT + 1))
    send(browser, "Hello")
    status = wait_for(browser, "document.getElementById('status').textContent")
    assert "more than the model's context" in status
    assert replies(browser) == []
    assert browser.execute_script("return document.getElementById('input').value") == "Hello"


def test_a_conversation_that_outgrows_the_context_leaves_its_oldest_exchange_out(
    live: Live, browser: webdriver.Chrome
) -> None:
    open_page(browser, live)
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


def test_markdown_is_rendered_and_html_in_a_reply_never_runs(live: Live, browser: webdriver.Chrome) -> None:
    open_page(browser, live)

    def render(text: str) -> dict:
        """renderMarkdown's output: its HTML, its text, and the tags it holds."""
        return browser.execute_script(
            "const div = document.createElement('div'); div.append(renderMarkdown(arguments[0]));"
            "return {html: div.innerHTML, text: div.textContent,"
            " tags: [...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase())}",
            text,
        )

    hostile = '<script>window.ran = 1</script> <img src=x onerror="window.ran = 1"> <b>bold?</b>'
    shown = render(hostile)
    assert shown["tags"] == ["p"] and shown["text"] == hostile  # shown as written, as text
    assert "<img" not in shown["html"] and "&lt;img" in shown["html"]
    code = render("```html\n<img src=x onerror=alert(1)>\n```")
    assert code["tags"] == ["pre", "code"] and code["text"] == "<img src=x onerror=alert(1)>"

    inline = render("**bold** and *italic* and _also_ and `a<b` in snake_case_name")
    assert inline["html"] == (
        "<p><strong>bold</strong> and <em>italic</em> and <em>also</em> and <code>a&lt;b</code> in snake_case_name</p>"
    )
    lists = render("Steps:\n- one\n- **two**\n\n1. first\n2. second")
    assert lists["html"] == (
        "<p>Steps:</p><ul><li>one</li><li><strong>two</strong></li></ul><ol><li>first</li><li>second</li></ol>"
    )
    links = render("[docs](https://example.com/a?b=1) [bad](javascript:alert(1)) [data](data:text/html,x)")
    assert links["tags"] == ["p", "a"]
    assert (
        '<a href="https://example.com/a?b=1" target="_blank" rel="noopener noreferrer">docs</a>'
        in links["html"]
    )
    assert "[bad](javascript:alert(1)) [data](data:text/html,x)" in links["text"]

    # a reply on the page goes through the same renderer: one restored from storage holding HTML stays text
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": hostile}]
    browser.execute_script(
        "localStorage.setItem('talm-chat', JSON.stringify({chat: {messages: arguments[0], dropped: 0}}))",
        conversation,
    )
    browser.get(live.url + "/")
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    assert replies(browser) == [hostile]
    assert (
        browser.execute_script("return document.querySelectorAll('#messages img, #messages script').length")
        == 0
    )
    assert browser.execute_script("return window.ran") is None


def test_the_conversation_and_settings_survive_a_reload(live: Live, browser: webdriver.Chrome) -> None:
    open_page(browser, live)
    for field, value in (("temperature", "0"), ("max-tokens", "6"), ("system", "Be brief.")):
        browser.execute_script(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input'))",
            field,
            value,
        )
    send(browser, "Hello")
    wait_until_replied(browser, 1)
    first = replies(browser)

    browser.refresh()
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    assert replies(browser) == first
    settings = browser.execute_script(
        "return ['temperature', 'max-tokens', 'system'].map(id => document.getElementById(id).value)"
    )
    assert settings == ["0", "6", "Be brief."]
    send(browser, "And then?")  # the restored conversation is the one sent
    wait_until_replied(browser, 2)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first[0]},
        {"role": "user", "content": "And then?"},
    ]
    assert replies(browser)[1] == greedy_reply(live, conversation, 6)

    browser.execute_script("document.getElementById('new-chat').click()")
    browser.refresh()
    wait_for(browser, f"document.getElementById('model').textContent === {NAME!r}")
    assert replies(browser) == []


def test_a_send_the_server_never_gets_says_it_cannot_reach_the_server(
    browser: webdriver.Chrome, tmp_path: Path
) -> None:
    model_dir = endless_chat_model_dir(tmp_path / "models" / NAME, context=64)
    with serving(model_dir, NAME) as gone:
        open_page(browser, gone)
    send(browser, "Hello")  # the server has stopped
    shown = wait_for(browser, "document.getElementById('status').textContent")
    assert "cannot reach the server" in shown
    assert replies(browser) == []
    assert browser.execute_script("return document.getElementById('input').value") == "Hello"  # to send again
