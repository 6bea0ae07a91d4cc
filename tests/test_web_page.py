"""The chat page at GET /, driven in headless Chromium (Debian's, through Playwright): stream, Stop, new chat, no HTML injection."""
import shutil
from pathlib import Path

import pytest

from .test_server import Server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed to drive the browser")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

if CHROMIUM is None:
    pytest.skip("Chromium is not installed (Debian package `chromium`; .ci/run installs it)", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server():
    s = Server("--model", "smollm2", "--max_batch", "4", "--n_ctx", "1024", "--api_key", "pagekey")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page(viewport={"width": 390, "height": 800})  # phone width
        pg.on("dialog", lambda d: d.accept("pagekey"))  # the page asks for the API key on a 401
        pg.goto(server.url + "/")
        yield pg
        browser.close()


def wait_idle(page):
    page.wait_for_function("document.getElementById('send').disabled === false", timeout=120_000)


def test_streamed_answer_model_name_and_speed(page):
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2'", timeout=30_000)
    page.click("#toggle-settings")
    page.fill("#temperature", "0")
    page.fill("#input", "Name the capital of France.")  # see test_chat_cli: the other wording nearly ties
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .content:not(:empty)", timeout=60_000)  # tokens appear as they stream
    wait_idle(page)
    answer = page.locator(".msg.assistant .content").last.inner_text()
    assert "Paris" in answer
    assert "tokens/s" in page.locator(".msg.assistant .stats").last.inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-answer.png"))


def test_stop_mid_answer_then_new_chat(page, server):
    page.fill("#max-tokens", "600")
    page.fill("#input", "Write a very long story about a dragon who learns to bake bread.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[1]?.textContent.length > 20",
                           timeout=60_000)
    page.click("#stop")
    wait_idle(page)
    assert "stopped" in page.locator(".msg.assistant .stats").last.inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-stopped.png"))
    import time

    import httpx  # the server freed the slot of the aborted request
    deadline = time.monotonic() + 20
    while httpx.get(server.url + "/health").json()["slots_processing"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_model_output_html_is_shown_as_text(page):
    page.evaluate("""() => {
        const div = addMessage('assistant', '<script>window.pwned = 1</script><img src=x onerror="window.pwned=2"> **bold** `code`');
    }""")
    html = page.locator(".msg.assistant .content").last.inner_html()
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert page.evaluate("window.pwned === undefined")
    page.click("#new-chat")


def test_a_page_on_another_origin_calls_the_api(server, page, tmp_path):
    """A browser app served from another origin sends a preflighted request (JSON body, Authorization header)
    and reads the answer: CORS lets it."""
    import http.server
    import threading

    from .helpers import free_port

    (tmp_path / "app.html").write_text(f"""<!doctype html><script>
      window.result = fetch("{server.url}/v1/chat/completions", {{method: "POST",
        headers: {{"Content-Type": "application/json", "Authorization": "Bearer pagekey"}},
        body: JSON.stringify({{model: "any", max_tokens: 4, temperature: 0,
                               messages: [{{role: "user", content: "Hi"}}]}})}})
        .then(r => r.json()).then(j => j.choices[0].message.content, e => "failed: " + e);
    </script>""")
    port = free_port()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    other = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        context = page.context.browser.new_context()  # the same browser, a fresh context
        app = context.new_page()
        app.goto(f"http://127.0.0.1:{port}/app.html")  # another port: another origin
        answer = app.evaluate("window.result")
        context.close()
    finally:
        other.shutdown()
    assert answer and not answer.startswith("failed"), answer
