"""The playground page in real headless Chromium (Debian's package, driven by playwright)
against a real server: it streams, stops, and says what went wrong."""

import re
import shutil

import httpx
import pytest
from service_helpers import app_command, metric, running_server, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

# Skipped as a module, so that the reason is one line (`make test` installs chromium where it can: root, apt-get)
CHROMIUM = shutil.which("chromium")  # Debian's package
if not CHROMIUM:
    pytest.skip(
        "browser tests skipped: chromium not found; run `sudo apt-get install chromium` or `sudo make test-deps`",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests skipped: playwright not found; run `make install`"
)

# No sandbox: we run as root in a container; the rest keeps Chromium off the network and quiet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LONG = 2048  # the most a request may ask for: far longer than any check below takes
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def wait_for(page, js, timeout=WAIT_MS / 1000):
    """Polls a JS expression from here: wait_for_function evaluates strings inside the page,
    which the page's Content-Security-Policy forbids (as it should)."""
    assert wait_until(lambda: page.evaluate(js), timeout), f"timed out waiting for {js}"


def open_page(browser, url):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url + "/")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server.url)
    wait_for(page, "document.getElementById('model').options.length > 1")  # the models arrived
    yield page
    page.close()


def output_length(page):
    return page.evaluate("document.getElementById('output').textContent.length")


def idle(server):
    text = server.metrics()
    return metric(text, "quill_requests_running") == 0 and metric(text, "quill_requests_queued") == 0


def test_page_lists_the_served_models_from_v1_models(page):
    options = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert options == ["tiny-gpt", "tiny-lstm"]
    labels = page.eval_on_selector_all("#model option", "options => options.map(o => o.text)")
    assert labels == ["tiny-gpt (gpt, char tokens)", "tiny-lstm (lstm, char tokens)"]


def test_text_grows_as_tokens_arrive_and_stop_cancels_the_generation_on_the_server(page, server):
    tokens_before = metric(server.metrics(), "quill_tokens_generated_total", model="tiny-gpt") or 0
    page.fill("#prompt", "Hello")
    page.fill("#max_new_tokens", str(LONG))
    page.click("#generate")

    lengths = set()

    def grew_twice():
        lengths.add(output_length(page))
        return len(lengths - {0}) >= 3

    assert wait_until(grew_twice, timeout=20, interval=0.01), f"the output never grew while streaming: {lengths}"
    page.click("#stop")

    wait_for(page, "document.getElementById('status').textContent.startsWith('Stopped')")
    stopped_at = int(page.inner_text("#status").split()[2])  # "Stopped after N tokens."
    assert 0 < stopped_at < LONG
    assert page.is_hidden("#stats")  # no done event: it never finished
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    assert wait_until(lambda: idle(server), timeout=5), "the server is still generating for the stopped page"
    generated = metric(server.metrics(), "quill_tokens_generated_total", model="tiny-gpt") - tokens_before
    assert generated < LONG


def test_finished_generation_shows_the_same_text_as_the_api_and_the_final_stats(page, server):
    page.fill("#prompt", "To be")
    page.select_option("#model", "tiny-lstm")
    for field, value in {
        "#temperature": "0.9",
        "#max_new_tokens": "40",
        "#top_k": "20",
        "#top_p": "0.95",
        "#min_p": "0.05",
        "#repetition_penalty": "1.3",
        "#seed": "7",
    }.items():
        page.fill(field, value)
    page.click("#generate")
    page.wait_for_selector("#stats", state="visible")

    body = {
        "prompt": "To be",
        "model": "tiny-lstm",
        "temperature": 0.9,
        "max_new_tokens": 40,
        "top_k": 20,
        "top_p": 0.95,
        "min_p": 0.05,
        "repetition_penalty": 1.3,
        "seed": 7,
        "stream": False,
    }
    expected = httpx.post(server.url + "/generate", json=body, timeout=30).json()
    assert page.text_content("#output") == expected["text"]
    assert page.text_content("#echo") == "To be"
    assert page.inner_text("#stat-tokens") == "40"
    assert float(page.inner_text("#stat-rate")) > 0
    assert page.inner_text("#stat-ttft").endswith(" ms")
    assert page.inner_text("#stat-finish") == "length"
    assert page.inner_text("#stat-seed") == "7"
    assert page.is_hidden("#error")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("#temperature", "99", "temperature: Input should be less than or equal to 5"),
        ("#top_p", "0", "top_p: Input should be greater than 0"),
    ],
)
def test_invalid_value_is_sent_and_the_servers_422_message_is_shown(page, field, value, words):
    page.fill(field, value)
    page.click("#generate")
    error = page.wait_for_selector("#error", state="visible")
    assert error.inner_text() == f"The server refused a value (HTTP 422): {words}"
    assert page.is_hidden("#stats")
    assert page.is_enabled("#generate")


def test_a_regex_constrains_the_output_and_a_broken_one_shows_the_servers_message(page, server):
    pattern = r"(yes|no), [a-z]{2,5}\."
    page.fill("#prompt", "Well")
    page.fill("#regex", pattern)
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_selector("#stats", state="visible")
    body = {"prompt": "Well", "regex": pattern, "seed": 3, "stream": False, "model": "tiny-gpt"}
    expected = httpx.post(server.url + "/generate", json=body, timeout=30).json()
    assert page.text_content("#output") == expected["text"] and re.fullmatch(pattern, expected["text"])
    assert page.inner_text("#stat-finish") == "stop"
    page.fill("#regex", "(unclosed")
    page.click("#generate")
    error = page.wait_for_selector("#error", state="visible")
    assert error.inner_text().startswith("The server refused a value (HTTP 422): regex: ")


def test_server_at_capacity_shows_the_429_message_in_words(page, server):
    # the server admits 4 running + 2 queued per model; hold them all
    with httpx.Client(timeout=60) as client:
        held = [
            client.send(
                client.build_request("POST", server.url + "/generate", json={"prompt": "Hi", "max_new_tokens": LONG}),
                stream=True,
            )
            for _ in range(6)
        ]
        try:
            assert all(r.status_code == 200 for r in held)
            page.click("#generate")
            error = page.wait_for_selector("#error", state="visible").inner_text()
        finally:
            for r in held:
                r.close()
    assert error.startswith("The server is busy (HTTP 429): model 'tiny-gpt' is at capacity")
    assert error.endswith("Retry in 1 s.")
    assert wait_until(lambda: idle(server), timeout=5)


def test_network_failure_is_shown_not_swallowed(page):
    page.route("**/generate", lambda route: route.abort("connectionrefused"))
    page.click("#generate")
    error = page.wait_for_selector("#error", state="visible").inner_text()
    assert error.startswith("Network error: could not reach the server")
    assert page.is_enabled("#generate") and page.is_disabled("#stop")


@pytest.mark.parametrize("failure", ["refused", "network"])
def test_new_request_clears_the_previous_result_so_an_error_is_never_shown_under_it(page, failure):
    page.fill("#max_new_tokens", "5")
    page.click("#generate")
    page.wait_for_selector("#stats", state="visible")
    assert len(page.text_content("#output")) == 5 and page.text_content("#echo")

    if failure == "refused":
        page.fill("#temperature", "99")  # the server answers 422
    else:
        page.route("**/generate", lambda route: route.abort("connectionrefused"))
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert page.text_content("#transcript") == ""
    assert page.is_hidden("#stats")


def test_with_an_api_key_the_page_opens_without_it_and_the_key_field_unlocks_the_api(browser, checkpoints, tmp_path):
    env = {"QUILL_API_KEY": "s3cret"}
    with running_server(app_command([checkpoints["tiny-gpt"]]), env, tmp_path / "server.log") as server:
        page = open_page(browser, server.url)
        error = page.wait_for_selector("#error", state="visible").inner_text()
        assert error.startswith("The server needs an API key, or the one given is wrong (HTTP 401)")

        page.fill("#api_key", "s3cret")
        page.press("#api_key", "Tab")  # the change event reloads the models with the key
        wait_for(page, "document.getElementById('model').value === 'tiny-gpt'")
        assert page.is_hidden("#error")
        page.fill("#max_new_tokens", "5")
        page.click("#generate")
        page.wait_for_selector("#stats", state="visible")
        assert page.inner_text("#stat-tokens") == "5"
        page.close()


LOCAL = re.compile(r"^(https?://(127\.0\.0\.1|localhost)[:/]|data:|blob:)")


@pytest.fixture
def offline_page(browser):
    """A page that reaches this machine only, as one offline or behind a strict firewall does: any other address
    is refused, and listed in `page.blocked`."""
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.blocked = []

    def refuse(route):
        page.blocked.append(route.request.url)
        route.abort("internetdisconnected")

    page.route(lambda url: not LOCAL.match(url), refuse)
    yield page
    page.close()


def test_the_api_docs_render_offline_from_the_servers_own_assets(offline_page, server):
    offline_page.goto(server.url + "/docs")
    operation = offline_page.locator(".opblock-summary-path", has_text="/generate").first
    operation.wait_for(state="visible")  # Swagger UI ran and rendered the schema
    operation.click()
    offline_page.locator(".opblock-body").first.wait_for(state="visible")
    assert offline_page.blocked == []
