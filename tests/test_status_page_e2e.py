"""The live status page in a real browser (Debian's Chromium, driven by Selenium)
against real systemd and the fake engine: it refuses without an operator key, shows
the pinned model ready, a load's progress bar advancing until the model is ready,
an eviction and a sleep in the event log, a load failure with its reason, and a
clear message while the loader is away.

Each state is saved as a screenshot, and the page's size and its update latency
(event to pixel: from the loader's change to the frame after the DOM showed it) are
written as figures, in $SSW_STATUS_PAGE_DIR (default .cache/status-page; the
committed ones are in bench/results/status-page/).

GPU 0 (10 GB) holds one of the two 6 GB sleepers at a time; GPU 1 the pinned model.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, WORK_ROOT, RedisServer, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
OUT = Path(os.environ.get("SSW_STATUS_PAGE_DIR", REPO / ".cache/status-page"))
SLEEPER = {"path": "fake-a", "vram_gb": 6, "gpus": [0], "sleep": True}
MODELS = {
    "pinned": {"path": "fake-a", "vram_gb": 2, "gpus": [1], "pinned": True},
    "slow": {**SLEEPER, "env": {"SSW_FAKE_LOAD_DELAY": "4"}},
    "rival": {**SLEEPER, "env": {"SSW_FAKE_LOAD_DELAY": "1"}},
    "broken": {"path": "fake-broken", "vram_gb": 1, "gpus": [1], "env": {"SSW_FAKE_FAIL": "exit-on-start"}},
}
FIGURES: dict[str, Any] = {"latencies_ms": []}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, redis_server: RedisServer) -> Iterator[Stack]:
    extra = {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}, {"memory_gb": 10}]},
        "placement": {"runtime_overhead_gb": 0, "sleep_ram_gb": 2},
        "workers": {"freed_timeout_s": 2, "sleep_residual_gb": 0.5},
        "auth": {"enabled": True},
        "gateway": {"keepalive_s": 1},
    }
    s = start_stack(
        sysbox, WORK_ROOT / f"status-page-{id(sysbox)}", models_root, MODELS, "fake", extra, redis_server.url
    )
    wait_for(lambda: any(w["model"] == "pinned" and w["state"] == "ready" for w in s.status()["workers"]), 60, "pinned")
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    keys = {"operator": stack.add_key("watcher", "--operator"), "plain": stack.add_key("client")}
    # The gateway picks up new keys within 2 s.
    for key in keys.values():
        auth = {"Authorization": f"Bearer {key}"}
        wait_for(lambda auth=auth: http("GET", stack.public + "/v1/models", headers=auth)[0] == 200, 10, "the keys")
    return keys


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()
    OUT.mkdir(parents=True, exist_ok=True)
    lat = sorted(FIGURES.pop("latencies_ms"))
    if lat:
        FIGURES["update_latency_ms"] = {
            "events": len(lat),
            "p50": round(statistics.median(lat), 1),
            "p95": round(lat[min(len(lat) - 1, int(len(lat) * 0.95))], 1),
            "max": round(lat[-1], 1),
        }
    (OUT / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def open_page(browser: webdriver.Chrome, stack: Stack, key: str | None) -> None:
    """The page, fresh: no key remembered, then ``key`` typed into its form."""
    harvest(browser)
    browser.get(stack.public + "/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.get(stack.public + "/ui")
    if key is not None:
        form = wait_for(lambda: visible(browser, "#login"), 10, "the key form")
        assert form
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()


def visible(browser: webdriver.Chrome, selector: str) -> bool:
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return bool(found) and found[0].is_displayed()


def text(browser: webdriver.Chrome, selector: str) -> str:
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def harvest(browser: webdriver.Chrome) -> None:
    """The page's event-to-pixel latencies so far (before it is reloaded)."""
    try:
        got = browser.execute_script("return window.__ssw ? window.__ssw.latencies : []")
    except WebDriverException:
        return
    FIGURES["latencies_ms"] += [float(x) for x in got or []]


def shot(browser: webdriver.Chrome, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(OUT / f"{name}.png"))


def state(stack: Stack, model: str) -> str | None:
    found = [w["state"] for w in stack.status()["workers"] if w["model"] == model]
    return found[0] if found else None


def chat(stack: Stack, key: str, model: str) -> tuple[int, Any]:
    status, _, body = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    return status, body


def test_the_page_refuses_without_an_operator_key(stack: Stack, keys: dict[str, str], browser: Any) -> None:
    open_page(browser, stack, None)
    wait_for(lambda: "needs an operator key" in text(browser, "#message"), 10, "the page to ask for a key")
    assert visible(browser, "#login") and not visible(browser, "#board")
    shot(browser, "1-asks-for-a-key")
    # A client's key is not an operator's: refused, and nothing of the host is shown.
    browser.find_element(By.ID, "key").send_keys(keys["plain"])
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_for(lambda: "Refused" in text(browser, "#message"), 10, "the refusal")
    assert "--operator" in text(browser, "#message") and not visible(browser, "#board")
    assert not browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
    # The stream itself: 401 without a key, 403 with a client's.
    assert http("GET", stack.public + "/ui/stream")[0] == 401
    status, _, body = http("GET", stack.public + "/ui/stream", headers={"Authorization": f"Bearer {keys['plain']}"})
    assert status == 403 and "--operator" in body["error"]["message"]


def test_the_page_shows_the_pinned_model_ready_and_its_gpu(stack: Stack, keys: dict[str, str], browser: Any) -> None:
    open_page(browser, stack, keys["operator"])
    row = '#workers tr[data-model="pinned"][data-state="ready"]'
    wait_for(lambda: visible(browser, row), 15, "the pinned model's row")
    assert text(browser, "#conn") == "live"
    assert "ssw-worker@pinned" in text(browser, row)
    assert "GPU 1" in text(browser, '#gpus [data-gpu="1"]') and "free of 10.0 GB" in text(browser, "#gpus")
    pin = next(w for w in stack.status()["workers"] if w["model"] == "pinned")
    assert pin["unit"] in text(browser, row)
    # The page's weight, once: its three files.
    sizes = {p: len(http("GET", stack.public + p)[2].encode()) for p in ("/ui", "/ui/page.js", "/ui/page.css")}
    FIGURES["page_bytes"] = {**sizes, "total": sum(sizes.values())}
    shot(browser, "2-pinned-ready")


def test_a_loads_progress_bar_advances_and_the_model_turns_ready(
    stack: Stack, keys: dict[str, str], browser: Any
) -> None:
    # A first load measures how long "slow" takes; the second shows an ETA from it.
    stack.unload("rival")
    stack.load("slow")
    stack.unload("slow")
    open_page(browser, stack, keys["operator"])
    wait_for(lambda: visible(browser, "#board"), 15, "the board")
    answer: dict[str, Any] = {}

    def ask() -> None:
        answer["status"], answer["body"] = chat(stack, keys["plain"], "slow")

    client = threading.Thread(target=ask)
    client.start()
    bar = '#loads .load[data-model="slow"] progress'
    wait_for(lambda: visible(browser, bar), 15, "slow's progress bar")
    first = float(browser.find_element(By.CSS_SELECTOR, bar).get_attribute("value") or 0)
    shot(browser, "3-load-in-progress")
    label = text(browser, '#loads .load[data-model="slow"]')
    assert "slow: load" in label and "ETA" in label, label
    # It advances (the page redraws every 2 s at least while it loads).
    wait_for(
        lambda: (
            visible(browser, bar)
            and float(browser.find_element(By.CSS_SELECTOR, bar).get_attribute("value") or 0) > first
        ),
        10,
        "the bar to advance",
    )
    wait_for(
        lambda: visible(browser, '#workers tr[data-model="slow"][data-state="ready"]'), 30, "slow ready on the page"
    )
    client.join(60)
    assert answer.get("status") == 200, answer
    assert not browser.find_elements(By.CSS_SELECTOR, '#loads .load[data-model="slow"]')
    shot(browser, "4-load-done")
    # The same progress is what /v1/models says while a model loads (checked here on
    # the record the page drew: ETA from the measured median).
    rows = [e for e in stack.status()["events"] if e["model"] == "slow" and e["kind"] == "ready"]
    assert rows and "expected" in rows[-1]["text"]


def test_an_eviction_and_a_sleep_show_in_the_event_log(stack: Stack, keys: dict[str, str], browser: Any) -> None:
    stack.unload("rival")
    stack.load("slow")
    open_page(browser, stack, keys["operator"])
    wait_for(lambda: visible(browser, "#board"), 15, "the board")
    # rival needs GPU 0, where slow is: slow is evicted and, with sleep mode, sleeps.
    stack.load("rival")
    wait_for(lambda: state(stack, "slow") == "sleeping", 30, "slow asleep")
    evicted = '#events li[data-kind="evicted"][data-model="slow"]'
    asleep = '#events li[data-kind="sleeping"][data-model="slow"]'
    wait_for(
        lambda: visible(browser, evicted) and visible(browser, asleep), 15, "the eviction and the sleep in the log"
    )
    assert "evicted to make room for rival" in text(browser, evicted)
    wait_for(lambda: "sleeping (level" in text(browser, '#workers tr[data-model="slow"]'), 10, "slow's tier")
    shot(browser, "5-eviction-and-sleep")


def test_a_load_failure_shows_with_its_reason(stack: Stack, keys: dict[str, str], browser: Any) -> None:
    open_page(browser, stack, keys["operator"])
    wait_for(lambda: visible(browser, "#board"), 15, "the board")
    status, _, body = http("POST", stack.admin + "/load", {"model": "broken"}, timeout=120)
    assert status >= 500, body
    failed = '#loads .load.failed[data-model="broken"]'
    wait_for(lambda: visible(browser, failed), 15, "broken's failure on the page")
    reason = text(browser, failed)
    assert "broken:" in reason and ("backing off" in reason or "cooling down" in reason), reason
    assert "stopped during start-up" in reason or "exit" in reason, reason
    failures = '#events li[data-model="broken"][data-kind="failed"]'
    wait_for(lambda: visible(browser, failures), 10, "the failed worker in the log")
    shot(browser, "6-load-failed")


def test_the_page_says_when_the_loader_is_away(stack: Stack, keys: dict[str, str], browser: Any) -> None:
    open_page(browser, stack, keys["operator"])
    wait_for(lambda: visible(browser, '#workers tr[data-model="pinned"]'), 15, "the board")
    stack.loader.stop()
    try:
        wait_for(lambda: "The loader is away" in text(browser, "#message"), 15, "the page to say the loader is away")
        shot(browser, "7-loader-away")
        # What it still knows stays on the page, marked as such by the message.
        assert visible(browser, "#board")
    finally:
        stack.restart(stack.loader)
    wait_for(lambda: text(browser, "#message") == "", 20, "the message to clear")


def test_the_models_list_shows_a_loads_phase_and_eta(stack: Stack, keys: dict[str, str]) -> None:
    stack.unload("rival")
    stack.unload("slow")
    stack.load("slow")  # measured at least once, whatever ran before
    stack.unload("slow")
    headers = {"Authorization": f"Bearer {keys['plain']}"}
    held: dict[str, Any] = {}

    def stream() -> None:
        body = {"model": "slow", "messages": CHAT, "max_tokens": 2, "stream": True}
        held["status"], _, held["body"] = http("POST", stack.public + "/v1/chat/completions", body, headers, 120)

    client = threading.Thread(target=stream)
    client.start()

    def loading() -> dict[str, Any] | None:
        models = http("GET", stack.public + "/v1/models", headers=headers)[2]["data"]
        entry = next(m for m in models if m["id"] == "slow")["ssw"]
        return entry.get("progress") if entry["state"] == "loading" else None

    progress = wait_for(loading, 15, "slow loading in /v1/models")
    client.join(60)
    assert progress["kind"] == "load" and progress["phase"] in (
        "placement",
        "eviction",
        "unit_start",
        "process_up",
        "engine_ready",
    )
    assert progress["expected_s"] is not None and progress["expected_s"] > 3  # the fake engine's 4 s delay
    assert 0 <= progress["eta_s"] <= progress["expected_s"] and progress["elapsed_s"] >= 0
    # The held stream's keep-alives (every second here) said the same as it went.
    assert held["status"] == 200 and held["body"].rstrip().endswith("data: [DONE]")
    beats = [line for line in held["body"].splitlines() if line.startswith(": ssw: waiting for slow: load, ")]
    assert beats and "ETA" in beats[-1], held["body"][:500]
