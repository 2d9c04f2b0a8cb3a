"""The operator's dashboard: a recorded run's page in real headless Chromium; its access rules.

The run is real (the built-in demo data under DP-SGD, one site failing its first
round), so the page's sites, ε and reasons are checked against the sites' own
ledgers and the metrics the server wrote. The browser is Debian's ``chromium`` with
``chromium-driver`` (``.ci/run`` installs them); without them the browser test skips.
"""

from __future__ import annotations

import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from medmeta.simulate import run_simulation
from medmeta_common.config import load_config
from medmeta_common.errors import ConfigError
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger
from server.dashboard.serve import dashboard_server
from server.state import RunState
from tests.federations import fails_first_training, federation

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "0123456789abcdef0123"


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dashboard")
    config = load_config(federation(tmp, server=", spare_rounds: 1"))
    out = tmp / "run"
    run_simulation(config, out, mods={"site-b": [fails_first_training()]})
    return out


@pytest.fixture
def serving(recorded_run: Path) -> Iterator[tuple[ThreadingHTTPServer, str]]:
    server = dashboard_server(recorded_run, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="no headless browser: install Debian's chromium and chromium-driver "
                    "(.ci/run does)")
def test_the_page_shows_the_sites_and_epsilon_of_the_ledgers(
        recorded_run: Path, serving: tuple[ThreadingHTTPServer, str], tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,1600"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                               options=options)
    try:
        browser.get(serving[1] + "/")
        run = browser.find_element(By.ID, "run")
        assert run.get_attribute("data-status") == "finished"
        assert "2 of 2" in run.text
        progress = RunState(recorded_run).read_progress()
        assert browser.find_element(By.ID, "config-hash").text == progress["config_hash"]
        for site in ("site-a", "site-b"):
            row = browser.find_element(By.CSS_SELECTOR, f'tr[data-site="{site}"]')
            ledger = read_ledger(recorded_run / "sites" / site / LEDGER_FILE)
            assert row.find_element(By.CLASS_NAME, "epsilon").text == f"{ledger.epsilon:.3f}"
            assert row.find_element(By.CLASS_NAME, "budget").text == "4"
            assert row.find_element(By.CLASS_NAME, "status").text == "accepted"
            assert row.find_element(By.CLASS_NAME, "accepted").text == "2"
        rounds = browser.find_element(By.ID, "rounds").text
        assert "1 (failed attempt 1)" in rounds
        assert "site-b: failed: RuntimeError: the site's GPU fell over" in rounds
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) >= 1
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        browser.quit()


def test_exposing_the_dashboard_needs_a_token(recorded_run: Path) -> None:
    with pytest.raises(ConfigError, match="--token"):
        dashboard_server(recorded_run, host="0.0.0.0", port=0)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        dashboard_server(recorded_run, host="0.0.0.0", port=0, token="short")


def test_with_a_token_every_request_carries_it_and_nothing_can_be_changed(
        recorded_run: Path) -> None:
    server = dashboard_server(recorded_run, port=0, token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/status.json")
        assert refused.value.code == 401
        wrong = urllib.request.Request(base + "/", headers={"Authorization": "Bearer nope"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong)
        assert refused.value.code == 401
        bearer = urllib.request.Request(base + "/status.json",
                                        headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(bearer) as reply:
            assert b'"rounds_done": 2' in reply.read()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as moved:
            opener.open(base + f"/?token={TOKEN}")
        assert moved.value.code == 303 and moved.value.headers["Location"] == "/"
        cookie = moved.value.headers["Set-Cookie"].split(";")[0]
        with urllib.request.urlopen(urllib.request.Request(
                base + "/", headers={"Cookie": cookie})) as reply:
            assert b'tr data-site="site-a"' in reply.read()
        post = urllib.request.Request(base + "/", data=b"x", method="POST",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as read_only:
            urllib.request.urlopen(post)
        assert read_only.value.code == 405
    finally:
        server.shutdown()
        server.server_close()
