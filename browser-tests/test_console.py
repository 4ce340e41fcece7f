"""The admin console in a real browser (headless Debian chromium through Playwright), against its
contract (URLs, element ids and classes, status codes): search, the event page, replaying a dead
delivery, CSRF, escaping, and the token on a non-loopback listener. Saves the README's screenshots."""

import re
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import IPND, SCRIPT_ORDER, Daemon, wait_until, write_script


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def url_path(url: str) -> str:
    return urllib.parse.urlsplit(url).path


def text(locator) -> str:
    return locator.inner_text().strip()


def assert_no_template_leaks(page):
    """Swift optionals and unfilled template tags must never reach the page as text."""
    # Outside pre: IPN bodies and hook output are the sender's text, shown as it came.
    body = page.evaluate("""() => {
        const copy = document.body.cloneNode(true);
        copy.querySelectorAll("pre").forEach(pre => pre.remove());
        return copy.textContent;
    }""")
    for leak in [r"\bnil\b", r"Optional\(", r"\{\{", r"\}\}"]:
        found = re.search(leak, body)
        assert not found, f"{page.url} shows {found.group()!r}: ...{body[max(0, found.start() - 60):found.end() + 60]}..."


def search(page, daemon, query: str):
    page.goto(daemon.console + "/events")
    form = page.locator("form#search")
    form.locator("input[name=q]").fill(query)
    with page.expect_navigation():
        form.locator("button, input[type=submit]").first.click()
    assert "q=" in page.url, page.url


def delivery_state(page, hook: str) -> str:
    return text(page.locator(f"section#deliveries tr.delivery[data-hook='{hook}'] td.delivery-state"))


def test_search_by_order_id_finds_the_event(page, daemon, events):
    event = events["search"]
    search(page, daemon, event.order_id)
    rows = page.locator("table#events tr.event")
    assert rows.count() == 1
    assert text(rows.locator("td.order")) == event.order_id
    link = rows.locator("a.event-link")
    assert event.id in text(link)
    assert url_path(link.get_attribute("href")).endswith(f"/events/{event.id}")

    # The transaction id finds the same event; an order id nobody used finds nothing.
    search(page, daemon, event.transaction_id)
    assert page.locator("table#events tr.event a.event-link").all_inner_texts() == [event.id]
    search(page, daemon, event.order_id + "-NOBODY")
    assert page.locator("table#events tr.event").count() == 0

    assert page.goto(daemon.console + f"/events?q={urllib.parse.quote(event.order_id)}").status == 200
    with page.expect_navigation():
        page.locator("table#events tr.event a.event-link").click()
    assert url_path(page.url) == f"/events/{event.id}"
    assert text(page.locator("#event-order")) == event.order_id


def test_event_page_shows_receipts_attempts_and_deliveries(page, daemon, events):
    event = events["search"]
    response = page.goto(daemon.console + f"/events/{event.id}")
    assert response.status == 200
    assert text(page.locator("#event-state")) == "verified"
    assert text(page.locator("#event-type")) == "checkout.accepted"
    assert text(page.locator("#event-order")) == event.order_id

    receipts = page.locator("section#receipts tr.receipt")
    assert receipts.count() == 1
    body = text(page.locator("section#receipts pre.ipn-body"))
    assert event.transaction_id in body and event.order_id in body, body

    attempts = page.locator("section#verification-attempts tr.verification-attempt")
    assert attempts.count() >= 1
    assert any("verified" in attempt for attempt in attempts.all_inner_texts()), attempts.all_inner_texts()

    assert page.locator("section#deliveries tr.delivery").count() == 2
    assert delivery_state(page, "fulfil") == "delivered"
    assert delivery_state(page, "flaky") == "dead"
    runs = page.locator("section#deliveries tr.delivery-attempt")
    assert runs.count() >= 2
    outputs = "\n".join(page.locator("section#deliveries pre.output").all_inner_texts())
    assert f"fulfilled order {event.order_id}" in outputs, outputs
    assert f"flaky-ok missing: refusing {event.id}" in outputs, outputs

    replay = page.locator("form.replay").first
    assert replay.get_attribute("method").lower() == "post"
    assert replay.get_attribute("action").endswith(f"/events/{event.id}/replay")
    assert replay.locator("input[name=csrf]").first.get_attribute("value")
    assert "Replay" in text(replay.locator("button").first)
    assert_no_template_leaks(page)


def test_replay_button_delivers_a_dead_delivery(page, daemon, events):
    event = events["replay"]
    page.goto(daemon.console + "/deliveries")
    row = page.locator("tr.delivery[data-hook='flaky']").filter(has=page.locator(f"a[href$='/events/{event.id}']"))
    assert row.count() == 1
    assert text(row.locator("td.delivery-state")) == "dead"
    assert "flaky" in " ".join(page.locator("form.replay-hook").all_inner_texts())

    (daemon.directory / "flaky-ok").touch()
    with page.expect_navigation():
        row.locator("form.replay button").click()
    assert url_path(page.url) == f"/events/{event.id}", page.url

    def delivered():
        page.goto(daemon.console + f"/events/{event.id}")
        return delivery_state(page, "flaky") == "delivered"

    wait_until(f"{event.id} shown delivered to flaky", delivered, timeout=15, interval=0.5)
    assert event.id in lines(daemon.directory / "flaky.log")
    # Only the hook asked for ran again: fulfil delivered it once.
    assert [line for line in lines(daemon.directory / "fulfilled.log") if line.startswith(event.id)] == [
        f"{event.id} {event.order_id}"]
    assert delivery_state(page, "fulfil") == "delivered"
    outputs = "\n".join(page.locator("section#deliveries pre.output").all_inner_texts())
    assert f"flaky delivered {event.id}" in outputs, outputs


def test_post_without_csrf_token_or_from_another_origin_is_refused(page, context, daemon, events):
    event = events["csrf"]
    page.goto(daemon.console + f"/events/{event.id}")
    token = page.locator("form.replay input[name=csrf]").first.get_attribute("value")
    assert token
    assert any(c["name"] == "payop_ipnd_csrf" for c in context.cookies(daemon.console))
    url = daemon.console + f"/events/{event.id}/replay"
    own = {"Origin": daemon.console}

    def post(path_url, form, headers):
        return context.request.post(path_url, form=form, headers=headers, max_redirects=0)

    refused = [
        ("no csrf field", post(url, {"hook": "fulfil"}, own)),
        ("a wrong csrf field", post(url, {"hook": "fulfil", "csrf": token[::-1] + "x"}, own)),
        ("another origin", post(url, {"hook": "fulfil", "csrf": token}, {"Origin": "http://evil.example"})),
        ("replay-dead without csrf", post(daemon.console + "/deliveries/replay-dead", {"hook": "fulfil"}, own)),
    ]
    for what, response in refused:
        assert response.status == 403, f"{what}: {response.status}"
    for what, response in refused[:2]:
        assert "csrf" in response.text().lower(), f"{what}: the 403 page does not name the CSRF token"
    # Without the cookie the token is bound to, the right field is refused too (urllib: no cookie jar).
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode({"hook": "fulfil", "csrf": token}).encode(), headers=own, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused_without_cookie:
        urllib.request.urlopen(request, timeout=5)
    assert refused_without_cookie.value.code == 403

    time.sleep(1.5)  # the dispatcher notices a replay within about a second
    fulfilled = daemon.directory / "fulfilled.log"
    assert [line for line in lines(fulfilled) if line.startswith(event.id)] == [f"{event.id} {event.order_id}"]

    # The same POST with the token, from the console's own origin, is taken.
    accepted = post(url, {"hook": "fulfil", "csrf": token}, own)
    assert accepted.status == 303
    assert url_path(accepted.headers["location"]) == f"/events/{event.id}", accepted.headers["location"]
    wait_until(
        "the accepted replay to run fulfil again",
        lambda: len([line for line in lines(fulfilled) if line.startswith(event.id)]) == 2)


def test_script_in_an_order_id_renders_as_text(page, daemon, events):
    event = events["script"]
    search(page, daemon, SCRIPT_ORDER)
    assert text(page.locator("table#events tr.event td.order")) == SCRIPT_ORDER
    with page.expect_navigation() as navigation:
        page.locator("table#events tr.event a.event-link").click()
    response = navigation.value
    assert url_path(page.url) == f"/events/{event.id}"
    assert text(page.locator("#event-order")) == SCRIPT_ORDER
    assert page.locator("#event-order *").count() == 0
    assert "<script>alert(1)" in text(page.locator("pre.ipn-body"))
    assert SCRIPT_ORDER in page.locator("body").inner_text()
    for path in ["/", "/deliveries", "/receipts", f"/events?q={urllib.parse.quote(SCRIPT_ORDER)}"]:
        assert page.goto(daemon.console + path).status == 200, path
        assert_no_template_leaks(page)
    page.goto(daemon.console + f"/events/{event.id}")
    injected = page.evaluate("() => [...document.querySelectorAll('script')].filter(s => s.textContent.includes('alert(1)')).length")
    assert injected == 0
    assert page.dialogs == []
    headers = response.headers
    assert "default-src 'none'" in headers.get("content-security-policy", ""), headers
    assert headers.get("x-content-type-options") == "nosniff"


@pytest.fixture(scope="module")
def token_daemon(workdir, simulator):
    """A second daemon whose admin listener is on every address (0.0.0.0), so it needs a token."""
    directory = workdir / "token-daemon"
    directory.mkdir()
    write_script(directory / "hook", "#!/bin/sh\nexit 0\n")
    hooks = f"  - name: noop\n    command: [{directory}/hook]\n    events: [\"*\"]\n"
    daemon = Daemon(directory, simulator, admin_host="0.0.0.0", token=secrets.token_urlsafe(24), hooks=hooks)
    daemon.start()
    yield daemon
    daemon.stop()


def status(url: str, headers=None, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_non_loopback_console_refuses_pages_without_the_token(page, context, token_daemon):
    console = token_daemon.console
    for path in ["/", "/events", "/deliveries", "/receipts"]:
        code, body = status(console + path)
        assert code == 401, f"{path} without the token: {code}"
        assert 'id="login"' in body, f"{path}: no login form"
    code, _ = status(console + "/events/evt_x/replay", data=b"csrf=x&hook=noop")
    assert code == 401
    assert status(console + "/healthz")[0] == 200
    assert status(console + "/", {"Authorization": f"Bearer {token_daemon.token}"})[0] == 200
    assert status(console + "/events", {"Authorization": f"Bearer {token_daemon.token}"})[0] == 200
    assert status(console + "/", {"Authorization": f"Bearer {token_daemon.token}x"})[0] == 401

    response = page.goto(console + "/")
    assert response.status == 401
    login = page.locator("form#login")
    login.locator("input[name=token]").fill(token_daemon.token + "-wrong")
    with page.expect_navigation() as wrong:
        login.locator("button, input[type=submit]").first.click()
    assert wrong.value.status == 401
    assert page.locator("form#login input[name=token]").count() == 1
    assert not any(c["name"] == "payop_ipnd_session" for c in context.cookies(console))

    page.locator("form#login input[name=token]").fill(token_daemon.token)
    with page.expect_navigation() as right:
        page.locator("form#login").locator("button, input[type=submit]").first.click()
    assert right.value.status == 200
    assert page.url.startswith(console) and url_path(page.url) == "/", page.url
    assert page.locator("#ipns-hour").count() == 1
    assert any(c["name"] == "payop_ipnd_session" for c in context.cookies(console))
    assert page.goto(console + "/events").status == 200


def test_check_config_refuses_a_non_loopback_console_without_a_token(token_daemon):
    good = subprocess.run([str(IPND), "check-config", "--config", str(token_daemon.config)], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    config = token_daemon.config.read_text()
    assert re.search(r"^  token_file: .*\n", config, re.M)
    bare = token_daemon.directory / "no-token.yaml"
    bare.write_text(re.sub(r"^  token_file: .*\n", "", config, flags=re.M))
    bad = subprocess.run([str(IPND), "check-config", "--config", str(bare)], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "token_file" in bad.stdout + bad.stderr


def test_overview_and_event_page_screenshots(page, daemon, events, screenshot_dir):
    response = page.goto(daemon.console + "/")
    assert response.status == 200
    for id in ["ipns-hour", "ipns-day", "events-hour", "events-day", "verification-backlog", "delivery-backlog",
               "dead-deliveries", "last-ipn", "payop-api"]:
        assert page.locator(f"#{id}").count() == 1, f"no #{id} on the overview"
    assert page.locator("svg#ipn-chart").count() == 1
    ipns_day = re.search(r"\d+", text(page.locator("#ipns-day")))
    assert ipns_day and int(ipns_day.group()) >= len(events), text(page.locator("#ipns-day"))
    assert_no_template_leaks(page)
    page.screenshot(path=str(screenshot_dir / "overview.png"), full_page=True)

    page.goto(daemon.console + f"/events/{events['search'].id}")
    assert page.locator("section#deliveries tr.delivery").count() == 2
    page.screenshot(path=str(screenshot_dir / "event.png"), full_page=True)
