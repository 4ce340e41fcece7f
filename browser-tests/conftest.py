"""Harness for the console's browser tests: a Payop simulator and payop-ipnd daemons of their own in a
temporary directory, IPNs played with `payop-ipnd simulate`, and a headless Debian chromium.

Run through scripts/browser-test.sh, which builds the binaries and sets PAYOP_BIN_DIR."""

import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

BIN_DIR = Path(os.environ.get("PAYOP_BIN_DIR", ".build/debug"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT_DIR = Path(os.environ.get("SCREENSHOT_DIR", "docs/screenshots"))
IPND = BIN_DIR / "payop-ipnd"
SIMULATOR = BIN_DIR / "payop-simulator"

SCRIPT_ORDER = "<script>alert(1)</script>"


_ports_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same one twice in a run."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def wait_until(what: str, check, timeout: float = 15.0, interval: float = 0.1):
    """Polls check() until it returns something truthy; fails the test naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def write_secret(path: Path, value: str):
    path.write_text(value + "\n")
    path.chmod(0o600)


def write_script(path: Path, text: str):
    path.write_text(text)
    path.chmod(0o755)


class Simulator:
    def __init__(self, directory: Path):
        self.port = free_port()
        self.jwt_file = directory / "payop-jwt"
        write_secret(self.jwt_file, "browser-test-jwt-" + secrets.token_hex(8))
        self.log = open(directory / "simulator.log", "wb")
        self.process = subprocess.Popen(
            [str(SIMULATOR), "--port", str(self.port), "--jwt-file", str(self.jwt_file)],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until("the simulator to listen", lambda: self.process.poll() is not None or http_status(self.url + "/") is not None)
        assert self.process.poll() is None, "payop-simulator exited: see simulator.log"

    def stop(self):
        stop_process(self.process)
        self.log.close()


def stop_process(process: subprocess.Popen):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Daemon:
    """One payop-ipnd serving a config of its own, verifying against the simulator."""

    directory: Path
    simulator: Simulator
    admin_host: str = "127.0.0.1"
    token: str | None = None
    hooks: str = ""
    ipn_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.directory / "payop-ipnd.yaml"

    @property
    def db(self) -> Path:
        return self.directory / "events.sqlite3"

    @property
    def console(self) -> str:
        """The console's origin, as a browser on this machine reaches it."""
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ipn_url(self) -> str:
        return f"http://127.0.0.1:{self.ipn_port}/payop/ipn"

    def write_config(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        admin = f"  listen: {self.admin_host}:{self.admin_port}\n"
        if self.token is not None:
            token_file = self.directory / "console-token"
            write_secret(token_file, self.token)
            admin += f"  token_file: {token_file}\n"
        self.config.write_text(
            "log_level: info\n"
            "server:\n"
            f"  listen: 127.0.0.1:{self.ipn_port}\n"
            "  allowed_sources: any\n"
            "admin:\n" + admin +
            "storage:\n"
            f"  path: {self.db}\n"
            "payop:\n"
            f"  api_base_url: {self.simulator.url}\n"
            f"  jwt_file: {self.simulator.jwt_file}\n"
            "  not_found_retry_minutes: 1\n"
            "delivery:\n"
            "  retry_initial_seconds: 1\n"
            "hooks:\n" + self.hooks)

    def start(self):
        self.write_config()
        self.log = open(self.directory / "daemon.log", "wb")
        self.process = subprocess.Popen(
            [str(IPND), "serve", "--config", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(
            "the daemon's /healthz",
            lambda: self.process.poll() is not None or http_status(self.console + "/healthz") == 200)
        assert self.process.poll() is None, f"payop-ipnd exited {self.process.returncode}: see {self.directory}/daemon.log"
        wait_until("the IPN listener", lambda: http_status(self.ipn_url) is not None)

    def stop(self):
        if self.process:
            stop_process(self.process)
            self.log.close()

    def simulate_checkout(self, order_id: str) -> str:
        """Plays Payop: an accepted checkout with this order id, its IPN posted; returns the transaction id."""
        run = subprocess.run(
            [str(IPND), "simulate", "checkout", "--state", "accepted", "--order-id", order_id,
             "--url", self.ipn_url, "--simulator", self.simulator.url],
            capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, f"simulate failed: {run.stdout}{run.stderr}"
        # "simulator: checkout ID is now in state 2 (accepted)"
        first = run.stdout.splitlines()[0].split()
        assert first[:2] == ["simulator:", "checkout"], run.stdout
        return first[2]

    def query(self, sql: str, *args):
        connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return connection.execute(sql, args).fetchall()
        finally:
            connection.close()

    def event_id(self, order_id: str) -> str | None:
        rows = self.query("SELECT id FROM events WHERE order_id = ? AND state = 'verified'", order_id)
        return rows[0][0] if len(rows) == 1 else None

    def delivery_states(self, event_id: str) -> dict[str, str]:
        return dict(self.query("SELECT hook, state FROM deliveries WHERE event_id = ?", event_id))


@dataclass
class Event:
    order_id: str
    transaction_id: str
    id: str = ""


@pytest.fixture(scope="session")
def workdir():
    directory = Path(tempfile.mkdtemp(prefix="payop-ipnd-browser."))
    yield directory
    if os.environ.get("KEEP_WORKDIR"):
        print(f"\nkept {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def simulator(workdir):
    simulator = Simulator(workdir)
    yield simulator
    simulator.stop()


@pytest.fixture(scope="session")
def daemon(workdir, simulator):
    """The console under test, on loopback without a token, with two hooks: `fulfil` always succeeds
    (appends to fulfilled.log), `flaky` fails until the file flaky-ok exists and has one attempt, so its
    deliveries go dead; when it succeeds it appends to flaky.log."""
    directory = workdir / "daemon"
    directory.mkdir()
    write_script(directory / "fulfil-hook", f"""#!/bin/sh
echo "$PAYOP_EVENT_ID $PAYOP_ORDER_ID" >>'{directory}/fulfilled.log'
echo "fulfilled order $PAYOP_ORDER_ID"
""")
    write_script(directory / "flaky-hook", f"""#!/bin/sh
if [ ! -e '{directory}/flaky-ok' ]; then
    echo "flaky-ok missing: refusing $PAYOP_EVENT_ID" >&2
    exit 1
fi
echo "$PAYOP_EVENT_ID" >>'{directory}/flaky.log'
echo "flaky delivered $PAYOP_EVENT_ID"
""")
    hooks = (
        "  - name: fulfil\n"
        f"    command: [{directory}/fulfil-hook]\n"
        "    events: [\"*\"]\n"
        "    timeout_seconds: 10\n"
        "  - name: flaky\n"
        f"    command: [{directory}/flaky-hook]\n"
        "    events: [\"checkout.*\"]\n"
        "    timeout_seconds: 10\n"
        "    max_attempts: 1\n")
    daemon = Daemon(directory, simulator, hooks=hooks)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def events(daemon) -> dict[str, Event]:
    """Accepted checkouts played through the simulator, each verified, delivered to `fulfil` and dead
    at `flaky`: `search` (search and event page), `replay`, `csrf`, `script` (an order id holding a
    script tag)."""
    tag = secrets.token_hex(3).upper()
    orders = {
        "search": f"ORDER-{tag}-SEARCH",
        "replay": f"ORDER-{tag}-REPLAY",
        "csrf": f"ORDER-{tag}-CSRF",
        "script": SCRIPT_ORDER,
    }
    played = {name: Event(order, daemon.simulate_checkout(order)) for name, order in orders.items()}
    for event in played.values():
        event.id = wait_until(f"order {event.order_id!r} verified", lambda: daemon.event_id(event.order_id))
        wait_until(
            f"{event.id}: fulfil delivered, flaky dead",
            lambda: daemon.delivery_states(event.id) == {"fulfil": "delivered", "flaky": "dead"})
    return played


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(10_000)
    yield context
    context.close()


@pytest.fixture
def page(context):
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = dialogs
    return page


@pytest.fixture
def screenshot_dir() -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR
