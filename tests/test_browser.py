"""The HTTP API in a real browser (Debian's Chromium driven by Playwright): a page on another
origin follows a session through a restart of `blackbird serve`, and the web console shows
sessions, live messages and quota use.

`serve` runs as a subprocess (as in test_cli) with a bootstrap token, with which the test
creates the API keys the pages use and posts messages over HTTP; usage is tracked through the SDK
and over HTTP. Every wait is bounded and polls the page's state, never a fixed sleep. A test
whose endpoints the running API does not have yet skips, naming them.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blackbird import BlackbirdSDK
from blackbird.server.embedded import _free_port

from .test_cli import Serve, cli, session_json

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install chromium; "
        ".ci/run installs it)", allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")

# Chromium on a closed network: no background connections, no first-run work, no sandbox (root).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOKEN = "browser-test-bootstrap-token"
WAIT_MS = 20_000  # the longest any one page condition may take

pytestmark = pytest.mark.timeout(90)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page of a fresh Chromium (its own empty profile); the page's console errors and
    uncaught exceptions are printed when a test fails."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        )
        try:
            tab = context.pages[0] if context.pages else context.new_page()
            tab.set_default_timeout(WAIT_MS)
            tab.on("console", lambda m: print(f"[page {m.type}] {m.text}"))
            tab.on("pageerror", lambda e: print(f"[page error] {e}"))
            yield tab
        finally:
            context.close()


class Deployment:
    """`blackbird serve --data-dir D --http 127.0.0.1:PORT` that can be stopped and started again
    on the same folder and port."""

    def __init__(self, tmp_path: Path, cors_origins: list[str]) -> None:
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tokens = tmp_path / "http-tokens.json"
        tokens.write_text(json.dumps({TOKEN: "default"}))
        self.args = [
            "--data-dir", str(self.data_dir), "--http", f"127.0.0.1:{self.port}", "--http-tokens", str(tokens),
            *[a for origin in cors_origins for a in ("--http-cors-origin", origin)],
        ]
        self.serve: Serve | None = None
        self.started: list[Serve] = []
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def start(self) -> None:
        self.serve = Serve(self.args, self.tmp_path)
        self.started.append(self.serve)
        self.serve.wait_ready()
        deadline = time.monotonic() + 15
        while True:  # the ready line may come before the HTTP listener accepts
            try:
                if httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"HTTP on {self.url} not answering; stderr={self.serve.stderr}")
            time.sleep(0.1)

    def require(self, *endpoints: str) -> None:
        """Skip unless the running API has every ``"METHOD /path"`` (while the HTTP API is being
        built, a test waits for the endpoints it drives instead of failing on a 404)."""
        paths = httpx.get(f"{self.url}/openapi.json", timeout=5).json()["paths"]
        missing = [e for e in endpoints if e.split()[0].lower() not in paths.get(e.split()[1], {})]
        if missing:
            pytest.skip(f"the HTTP API does not have {', '.join(missing)} yet")

    def stop(self) -> None:
        assert self.serve is not None
        assert self.serve.terminate() == 0, self.serve.stderr

    def close(self) -> None:
        self.http.close()
        for serve in self.started:
            serve.close()

    def create_session(self, user_id: str = "u1", tier: str = "pro") -> str:
        result = cli("session", "create", "--user-id", user_id, "--tier", tier, "--data-dir", str(self.data_dir),
                     cwd=self.tmp_path)
        assert result.returncode == 0, result.stderr
        return str(session_json(result)["session_id"])

    def api_key(self, role: str, user_id: str | None = None) -> str:
        """A new API key of the tenant (created with the bootstrap token)."""
        response = self.http.post("/v1/keys", json={"role": role, "user_id": user_id, "label": "browser test"})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def post(self, session_id: str, text: str, channel: str = "chat") -> None:
        response = self.http.post(f"/v1/sessions/{session_id}/messages", json={"channel": channel, "text": text})
        assert response.status_code in (200, 201), response.text


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Deployment] = []

    def make(cors_origins: list[str] = []) -> Deployment:  # noqa: B006 (never mutated)
        made.append(Deployment(tmp_path, cors_origins))
        return made[-1]

    yield make
    for deployment in made:
        deployment.close()


# A page of another origin following one session: a stream token fetched with the key (a CORS
# request with a preflight), then a plain EventSource. It keeps every chat message it receives,
# duplicates included, so the test sees exactly what the browser was sent. EventSource
# reconnects by itself (sending Last-Event-ID); if it gives up (readyState CLOSED), the page
# fetches a new token and resumes with ?after=<the last id>.
FOLLOWER_PAGE = """<!doctype html>
<meta charset="utf-8"><title>follower</title>
<script>
const params = new URLSearchParams(location.search);
const api = params.get("api"), key = params.get("key"), session = params.get("session");
window.collected = [];
window.opens = 0;
let last = null;
async function connect() {
  try {
    const response = await fetch(`${api}/v1/sessions/${session}/stream-token`, {
      method: "POST", headers: {Authorization: `Bearer ${key}`, "Content-Type": "application/json"}, body: "{}",
    });
    if (!response.ok) throw new Error(`stream-token: HTTP ${response.status}`);
    const issued = await response.json();
    const url = new URL(issued.url || `/v1/sessions/${session}/events`, api);
    url.searchParams.set("token", issued.token);
    if (last) url.searchParams.set("after", last);
    const source = new EventSource(url);
    source.onopen = () => { window.opens += 1; };
    source.addEventListener("chat", (event) => {
      last = event.lastEventId;
      window.collected.push(JSON.parse(event.data).text);
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 300);
    };
  } catch (error) {
    console.log(String(error));
    setTimeout(connect, 300);
  }
}
connect();
</script>
"""


@pytest.fixture
def other_origin() -> Iterator[str]:
    """A second local HTTP server (another port: another origin) serving FOLLOWER_PAGE at /."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = FOLLOWER_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- tests


def test_a_page_on_another_origin_gets_every_message_once_in_order_across_a_restart_of_serve(
    page: Any, other_origin: str, deployment_factory: Any
) -> None:
    deployment = deployment_factory([other_origin])
    deployment.start()
    deployment.require(
        "POST /v1/keys", "POST /v1/sessions/{session_id}/stream-token", "POST /v1/sessions/{session_id}/messages",
    )
    session_id = deployment.create_session(user_id="u1")
    key = deployment.api_key("user", user_id="u1")  # the page holds a key for its user only
    page.goto(f"{other_origin}/?api={deployment.url}&key={key}&session={session_id}")
    page.wait_for_function("() => window.opens >= 1")

    before = [f"before restart {i}" for i in range(5)]
    for text in before:
        deployment.post(session_id, text)
    page.wait_for_function("n => window.collected.length >= n", arg=len(before))
    assert page.evaluate("window.collected") == before

    deployment.stop()
    deployment.start()  # the same data folder and port

    after = [f"after restart {i}" for i in range(5)]
    for text in after:
        deployment.post(session_id, text)
    # a last message: anything the restart made the server send twice would arrive before it
    deployment.post(session_id, "last")
    expected = [*before, *after, "last"]
    page.wait_for_function("() => window.collected.includes('last')")
    assert page.evaluate("window.collected") == expected
    assert page.evaluate("window.opens") >= 2  # it did reconnect


def test_the_console_lists_a_session_follows_its_messages_and_quota_use_through_a_restart_of_serve(
    page: Any, deployment_factory: Any
) -> None:
    deployment = deployment_factory()
    deployment.start()
    deployment.require(
        "GET /v1/sessions", "GET /v1/sessions/{session_id}", "GET /v1/sessions/{session_id}/quota",
        "POST /v1/sessions/{session_id}/stream-token", "POST /v1/sessions/{session_id}/messages", "POST /v1/keys",
    )
    session_id = deployment.create_session(user_id="console-user", tier="pro")

    page.goto(f"{deployment.url}/")
    page.get_by_label("API key or bootstrap token").fill(deployment.api_key("admin"))
    page.get_by_role("button", name="Use this key").click()
    link = page.locator(f'a[data-session="{session_id}"]')
    link.wait_for()  # the list polls GET /v1/sessions
    link.click()
    page.locator("#stream-state", has_text="live").wait_for()

    text = f"hello from the test {uuid.uuid4().hex[:6]}"
    deployment.post(session_id, text)
    page.locator("#messages li", has_text=text).wait_for()

    page.locator("#post-text").fill("typed in the console")
    page.get_by_role("button", name="Send").click()
    page.locator("#messages li", has_text="typed in the console").wait_for()
    assert page.locator("#messages li", has_text=text).count() == 1

    tokens_gauge = '#session-quota [data-quota="tokens"] [role="meter"]'
    page.locator(tokens_gauge).wait_for()
    assert float(page.locator(tokens_gauge).get_attribute("aria-valuenow") or "-1") == 0.0
    sdk = BlackbirdSDK(data_dir=str(deployment.data_dir))
    try:
        limit = sdk.session_manager.get_quota(session_id, "tokens")["limit"]
        sdk.session_manager.track_usage(session_id, "completion", "tokens", limit / 4)
    finally:
        sdk.close()
    page.wait_for_function(
        "sel => Number(document.querySelector(sel)?.getAttribute('aria-valuenow')) === 25", arg=tokens_gauge
    )

    # a restart of serve: the console reconnects by itself (no reload) and misses nothing
    deployment.stop()
    deployment.start()
    deployment.post(session_id, "after the restart")
    page.locator("#messages li", has_text="after the restart").wait_for()
    page.locator("#status", has_text="connected").wait_for()
    assert page.locator("#messages li", has_text=text).count() == 1
    assert page.locator("#messages li", has_text="typed in the console").count() == 1



def test_the_dashboard_shows_quota_use_usage_over_time_denials_and_an_abuse_alert_as_it_happens(
    page: Any, deployment_factory: Any
) -> None:
    deployment = deployment_factory()
    deployment.start()
    deployment.require(
        "GET /v1/tenant/stats", "GET /v1/events", "POST /v1/sessions/{session_id}/usage", "POST /v1/keys",
    )
    session_id = deployment.create_session(user_id="noisy", tier="free")
    usage = f"/v1/sessions/{session_id}/usage"
    tracked = deployment.http.post(usage, json={"operation": "completion", "resource_type": "tokens", "amount": 100})
    assert tracked.status_code == 200, tracked.text

    page.goto(f"{deployment.url}/#/dashboard")
    page.get_by_label("API key or bootstrap token").fill(deployment.api_key("admin"))
    page.get_by_role("button", name="Use this key").click()
    page.locator(f'#active-sessions tr[data-session="{session_id}"] [data-quota="tokens"] [role="meter"]').wait_for()
    page.locator('#user-gauges [data-user="noisy"]').wait_for()
    page.locator("#usage-chart svg path.series").wait_for()
    page.locator("#events-state", has_text="live").wait_for()

    # 20 refusals of one session within a minute is a denial burst (projections.abuse)
    too_much = {"operation": "completion", "resource_type": "tokens", "amount": 1e15}
    for _ in range(21):
        refused = deployment.http.post(usage, json=too_much)
        assert refused.status_code == 429, refused.text
    page.locator('#alerts li[data-type="alert"][data-kind="denial_burst"]').wait_for()
    page.locator('#alerts li[data-type="denial"][data-kind="QuotaDenied"]').first.wait_for()  # each refusal, live
