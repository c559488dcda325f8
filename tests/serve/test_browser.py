"""The web chat page, end to end in headless Chromium: type, watch the reply stream in, screenshot.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (skipped with a message otherwise)
and the ``selenium`` package. The screenshot is written to ``tests/artifacts/chat_page.png``
(ignored by git) and its path printed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium not installed: apt-get install -y chromium chromium-driver",
)

# Records every text the assistant bubble shows, so the test sees the reply grow piece by piece.
OBSERVE = """
window.__seen = [];
new MutationObserver(() => {
  const a = document.querySelector('.msg.assistant');
  if (a && window.__seen[window.__seen.length - 1] !== a.textContent) window.__seen.push(a.textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
window.__bodies = [];
const realFetch = window.fetch;
window.fetch = (url, opts) => { if (opts && opts.body) window.__bodies.push(JSON.parse(opts.body)); return realFetch(url, opts); };
"""


@pytest.fixture()
def browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,700", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def test_chat_page_streams_a_reply(browser, slow_server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(slow_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "tiny-slow"))
    browser.execute_script(OBSERVE)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("40")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("Hello! What can you do?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]'))

    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello! What can you do?"
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("textContent")
    seen = [s for s in browser.execute_script("return window.__seen") if s]
    assert reply.strip(), "the assistant bubble stayed empty"
    assert len(seen) >= 3 and seen[-1] == reply, f"reply did not stream in pieces: {seen!r}"
    assert all(reply.startswith(s) for s in seen), "each streamed state must be a prefix of the final reply"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_element(By.ID, "send").is_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    print(f"screenshot: {shot}")

    # A request the server refuses (max_tokens over its limit) shows its message in an error bubble.
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("100000")
    box.send_keys("And a second question?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "exceeds this server's limit" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1, "no empty reply bubble is left behind"
    browser.save_screenshot(str(ARTIFACTS / "chat_page_error.png"))

    # The next message is sent with the whole conversation so far (the failed turn left out).
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("5")
    box.send_keys("Third message")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == 2)
    last = browser.execute_script("return window.__bodies")[-1]
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user"]
    assert last["messages"][1]["content"] == reply and last["messages"][2]["content"] == "Third message"
    assert last["stream"] is True and last["model"] == "tiny-slow"


# A page on another origin (here: another port) that tries to use the server three ways.
FOREIGN_PAGE = """<!doctype html><html><body><script>
window.__results = [];
async function attack(u) {
  const body = JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 2});
  try { const r = await fetch(u + "/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"}, body});
        window.__results.push("json:" + r.status + ":" + (await r.text()).length); }
  catch (e) { window.__results.push("json:blocked"); }
  try { const r = await fetch(u + "/v1/chat/completions", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body});
        window.__results.push("simple:" + r.type); }
  catch (e) { window.__results.push("simple:blocked"); }
  try { const r = await fetch(u + "/v1/models"); window.__results.push("models:" + r.status); }
  catch (e) { window.__results.push("models:blocked"); }
}
</script></body></html>"""


def test_page_on_another_origin_cannot_drive_generation(browser, chat_model) -> None:
    """A web page elsewhere (another origin) that fetches the API: the preflighted JSON request,
    a no-preflight 'simple' text/plain POST and a GET of /v1/models are all refused; the model
    never generates."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llama_pipe.models.generation import ChatModel
    from tests.serve.conftest import start_server

    calls: list[int] = []

    class Counting(ChatModel):
        def stream(self, *a, **k):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().stream(*a, **k)

    model = Counting(chat_model.model, chat_model.tokenizer, chat_model.template, "tiny")

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = FOREIGN_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    server, thread = start_server(model)
    try:
        browser.get(f"http://127.0.0.1:{site.server_address[1]}/")
        browser.execute_script(f"attack({server.url!r});")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(lambda d: len(d.execute_script("return window.__results")) == 3)
        results = browser.execute_script("return window.__results")
        assert results[0] == "json:blocked" and results[2] == "models:blocked", results
        assert results[1] in ("simple:opaque", "simple:blocked"), results  # the reply is unreadable either way
        assert not calls, "a page on another origin made the model generate"
        # The server's own page still works against the same server.
        browser.get(server.url + "/")
        assert browser.execute_script("return fetch('/v1/models').then(r => r.status)") == 200
    finally:
        server.shutdown()
        server.server_close()
        site.shutdown()
        site.server_close()
