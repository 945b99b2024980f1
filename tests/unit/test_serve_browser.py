"""task=serve in a real browser: Debian's headless Chromium driven by Playwright opens the page,
chats while the canvas denoises, samples side by side, fills in a span, and closes a tab mid-run.

The screenshots land in the test's folder. LDM_SERVE_EXPORT=<export> serves that export instead
of a tiny random one, and LDM_SERVE_SCREENSHOTS=<folder> copies the chat (mid-answer) and side
by side screenshots there: that is how docs/serve.png and docs/serve-side.png are made (with the
quickstart's SFT export).

Layer: unit, the page served in-process and driven by a real browser (the page's API:
test_serve.py; the OpenAI-compatible API: test_serve_api.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from test_sample_task import make_export  # noqa: E402
from test_serve import Live, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LDM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
# Records every state the chat canvas goes through, however fast the DOM changes.
WATCH = """
(id) => {
  window.ldmStates = window.ldmStates || {};
  const seen = window.ldmStates[id] = [];
  const host = document.getElementById(id);
  const read = () => {
    const c = host.querySelector('.ldm-canvas');
    if (c) seen.push(c.dataset.state + ':' + c.dataset.committed);
  };
  new MutationObserver(read).observe(host, {subtree: true, childList: true, attributes: true,
                                            characterData: true});
}
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    given = os.environ.get("LDM_SERVE_EXPORT")
    export = Path(given) if given else make_export(tmp_path_factory.mktemp("browser") / "chat",
                                                   chat=True)
    server = Live(export, title=export.name if given else "tiny")
    # A tiny model answers in milliseconds; slowing its calls to what a real model takes lets the
    # browser paint the steps one by one, as a person would see them.
    server.delay = 0.03
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:
        # a fresh profile (--user-data-dir) per run, so nothing cached from earlier runs is used
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1000})
        yield context
        context.close()


def canvas_state(page, id):
    return page.locator(f"#{id} .ldm-canvas").get_attribute("data-state")


def test_page_chats_with_a_live_canvas_then_side_by_side_and_infill(live, browser, tmp_path):
    page = browser.new_page()
    page.goto(live.url)
    page.locator("#chat-input textarea").wait_for(timeout=60_000)
    page.evaluate(WATCH, "chat-canvas")

    page.locator("#chat-input textarea").fill("Sort ascending: 42, 7, 19, 3")
    page.locator("#chat-send").click()
    page.wait_for_function(  # a canvas part filled in, part still masked
        "() => { const c = document.querySelector('#chat-canvas .ldm-canvas');"
        " return c?.dataset.state === 'running' && +c.dataset.committed >= 12; }",
        timeout=120_000)
    page.screenshot(path=str(tmp_path / "serve-running.png"), full_page=True)
    page.wait_for_function(
        "() => document.querySelector('#chat-canvas .ldm-canvas')?.dataset.state === 'done'",
        timeout=120_000)
    seen = page.evaluate("() => window.ldmStates['chat-canvas']")
    running = sorted({int(s.split(":")[1]) for s in seen if s.startswith("running:")})
    assert len(running) >= 2, seen  # at least two distinct intermediate canvases were drawn
    assert page.locator("#chat-canvas .ldm-mask").count() == 0
    page.locator("#chat-stats").get_by_text("model calls").first.wait_for(timeout=30_000)
    assert "tokens/s" in page.locator("#chat-stats").inner_text()
    assert "Sort ascending: 42, 7, 19, 3" in page.locator("#chatbot").inner_text()
    page.screenshot(path=str(tmp_path / "serve-chat.png"), full_page=True)

    page.get_by_role("tab", name="Side by side").click()
    page.locator("#side-input textarea").fill("What is required for a building permit?")
    page.evaluate(WATCH, "side-canvas-a")
    page.locator("#side-run").click()
    for side in ("a", "b"):
        page.wait_for_function(
            f"() => document.querySelector('#side-canvas-{side} .ldm-canvas')?.dataset.state"
            " === 'done'", timeout=120_000)
    left, right = (page.locator(f"#side-stats-{s}").inner_text() for s in ("a", "b"))
    assert "llada" in left and "fast" in right and "model calls" in left + right
    assert len({s for s in page.evaluate("() => window.ldmStates['side-canvas-a']")
                if s.startswith("running")}) >= 2
    page.screenshot(path=str(tmp_path / "serve-side.png"), full_page=True)

    page.get_by_role("tab", name="Infill").click()
    page.locator("#infill-run").click()
    page.wait_for_function(
        "() => document.querySelector('#infill-canvas .ldm-canvas')?.dataset.state === 'done'",
        timeout=120_000)
    filled = page.locator("#infill-output textarea").input_value()
    assert filled.lower().startswith("the king") and filled.endswith(".")  # uncased models too
    assert "[MASK" not in filled and "to the queen" in filled.lower()
    page.screenshot(path=str(tmp_path / "serve-infill.png"), full_page=True)

    page.get_by_role("tab", name="Chat").click()
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    if os.environ.get("LDM_SERVE_SCREENSHOTS"):  # the README's pictures
        folder = Path(os.environ["LDM_SERVE_SCREENSHOTS"])
        shutil.copy(tmp_path / "serve-running.png", folder / "serve.png")
        shutil.copy(tmp_path / "serve-side.png", folder / "serve-side.png")
    page.close()


def test_bad_settings_show_a_message_in_the_page(live, browser):
    page = browser.new_page()
    page.goto(live.url)
    page.locator("#chat-input textarea").wait_for(timeout=60_000)
    block = page.get_by_label("Block length")
    block.fill("7")
    block.press("Tab")
    page.locator("#chat-input textarea").fill("hello")
    page.locator("#chat-send").click()
    page.get_by_text("block_length=7").first.wait_for(timeout=30_000)
    page.close()


def test_closing_the_tab_stops_its_generation(live, browser):
    page = browser.new_page()
    page.goto(live.url)
    page.locator("#chat-input textarea").wait_for(timeout=60_000)
    for label, value in (("Max new tokens", "96"), ("Steps", "96"), ("Block length", "96")):
        page.get_by_label(label).last.fill(value)  # the settings panel's (side by side has one)
    page.locator("#chat-input textarea").fill("the king")
    before = dict(live.engine.stats)
    live.delay = 0.1  # 96 steps: about ten seconds, were it not stopped
    try:
        page.locator("#chat-send").click()
        wait_for(lambda: live.engine.running() == 1, timeout=60)
        wait_for(lambda: live.engine.stats["steps"] > before["steps"] + 2, timeout=60)
        page.close()
        wait_for(lambda: live.engine.running() == 0, timeout=60)
    finally:
        live.delay = 0.03
    after = live.engine.stats
    assert after["stopped"] == before["stopped"] + 1, (before, after)
    assert after["finished"] == before["finished"], (before, after)
    assert after["steps"] - before["steps"] < 96, (before, after)


def test_single_turn_model_says_so_and_answers_a_second_message_as_shown(browser, tmp_path_factory):
    export = make_export(tmp_path_factory.mktemp("single") / "chat", chat=True)
    server = Live(export, title="single", multi_turn=False)
    try:
        page = browser.new_page()
        page.goto(server.url)
        page.locator("#chat-input textarea").wait_for(timeout=60_000)
        assert "each message starts a new conversation" in page.locator("#chat-note").inner_text()
        assert not page.locator("#chat-send-conversation input").is_checked()
        for text in ("the king spoke", "and the queen?"):
            page.locator("#chat-input textarea").fill(text)
            page.locator("#chat-send").click()
            page.wait_for_function(  # the answer replaced the "…" placeholder
                f"() => {{ const t = document.querySelector('#chatbot').innerText;"
                f" return t.includes({text!r}) && !t.includes('…'); }}", timeout=120_000)
        shown = page.locator("#chatbot").inner_text()
        # The second message started a new conversation: it alone is shown, and it alone was sent.
        assert "and the queen?" in shown and "the king spoke" not in shown
        assert server.prompts[-1] == [{"role": "user", "content": "and the queen?"}]
        alone = server.client().predict(message="and the queen?", send_conversation=False,
                                        api_name="/chat")[0][-1]["content"][0]["text"]
        assert " ".join(alone.split()) in " ".join(shown.split())
        page.close()
    finally:
        server.close()
