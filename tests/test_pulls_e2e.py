"""Pulls from a hub, against a local one (tests/harness/fake_hub.py): end to end
with the CLI, resumed after the loader is killed mid-pull, a corrupted file, a
disk too small, cancel, and bad input. No test reaches a public hub."""

from __future__ import annotations

import concurrent.futures
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.fake_hub import COMMIT, FakeHub
from tests.harness.stack import WORK_ROOT, RedisServer, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
WEIGHTS = 3_000_000  # bytes of the hub model's safetensors


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    source = make_model_dir(WORK_ROOT / "hub-src" / "tiny", QWEN2_CONFIG, weight_bytes=WEIGHTS)
    (source / "model.safetensors").write_bytes(bytes(range(250)) * (WEIGHTS // 250))  # not all zeros
    (source / "tokenizer.json").write_text("{}")
    (source / "README.md").write_text("not fetched: no model needs it")
    server = FakeHub({"acme/tiny": source}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, hub: FakeHub, redis_server: RedisServer) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"pulls-models-{id(sysbox)}"
    models_dir.mkdir(parents=True, exist_ok=True)
    extra = {"pulls": {"endpoint": hub.url, "allow_http": True, "token_file": None, "min_free_gb": 0.1}}
    # A configured model whose files are absent, with an alias: a pull may not take that name.
    models = {"elsewhere": {"path": "not-here", "vram_gb": 1, "aliases": ["light"]}}
    s = start_stack(sysbox, WORK_ROOT / f"pulls-{id(sysbox)}", models_dir, models, "fake", extra, redis_server.url)
    yield s
    stop_stack(s)


@pytest.fixture(autouse=True)
def healthy_hub(hub: FakeHub) -> Iterator[None]:
    yield
    hub.slow, hub.corrupt, hub.sizes, hub.extra = 0, set(), {}, []


def models_dir(stack: Stack) -> Path:
    return WORK_ROOT / f"pulls-models-{id(stack.box)}"


def pull(stack: Stack, name: str, **extra: Any) -> tuple[int, Any]:
    status, _, body = http("POST", stack.admin + "/pull", {"repo": "acme/tiny", "name": name, **extra}, timeout=60)
    return status, body


def job(stack: Stack, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = http("GET", stack.admin + f"/jobs/{job_id}")[2]
    return body


def finished(stack: Stack, job_id: str, timeout: float = 60) -> dict[str, Any]:
    done: dict[str, Any] = wait_for(
        lambda: (j := job(stack, job_id))["status"] not in ("queued", "running") and j, timeout, f"job {job_id}"
    )
    return done


def test_a_pull_with_the_cli_lands_a_servable_model(stack: Stack, hub: FakeHub) -> None:
    cli = stack.cli("pull", "acme/tiny@main", "--name", "pulled")
    assert cli.returncode == 0, cli.stderr
    assert "pulled: in the models dir, servable now" in cli.stdout
    root = models_dir(stack)
    assert sorted(p.name for p in (root / "pulled").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not (root / ".partial").exists()
    listed = [m["id"] for m in http("GET", stack.public + "/v1/models")[2]["data"]]
    assert "pulled" in listed  # no restart, no rescan asked for
    status, _, body = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": "pulled", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"X-SSW-Wait": "true"},
        timeout=60,
    )
    assert status == 200 and body["model"] == "pulled"
    jobs = http("GET", stack.admin + "/jobs")[2]["jobs"]
    done = next(j for j in jobs if j["name"] == "pulled")
    assert done["status"] == "succeeded" and done["commit"] == COMMIT and done["revision"] == "main"
    fetched = sum((root / "pulled" / n).stat().st_size for n in ("config.json", "model.safetensors", "tokenizer.json"))
    assert done["bytes_done"] == done["bytes_total"] == fetched
    assert all(ISO_Z.match(done[k]) for k in ("created_at", "started_at", "finished_at"))
    log = stack.loader.log()
    assert f"pull {done['id']}: acme/tiny@main ({COMMIT}) as pulled: 3 files" in log
    assert f"pull {done['id']}: pulled is in" in log
    # One pull per target: the directory exists now.
    status, body = pull(stack, "pulled")
    assert status == 409 and "exists already" in body["error"]["message"]


def test_a_pull_resumes_after_the_loader_is_killed(stack: Stack, hub: FakeHub) -> None:
    hub.slow = 300_000  # about 10 s for the weights
    status, started = pull(stack, "resumed")
    assert status == 202, started
    wait_for(lambda: job(stack, started["id"])["bytes_done"] > 300_000, 30, "the download to be under way")
    stack.loader.kill(signal.SIGKILL)
    stack.restart(stack.loader)
    hub.slow = 0
    done = finished(stack, started["id"])
    assert done["status"] == "succeeded", done
    assert done["note"] == "resumed after a loader restart"
    assert any(r.startswith("model.safetensors: bytes=") for r in hub.ranges)  # went on from the partial file
    assert (models_dir(stack) / "resumed" / "model.safetensors").stat().st_size == WEIGHTS


def test_a_corrupted_file_fails_the_pull_with_the_reason(stack: Stack, hub: FakeHub) -> None:
    hub.corrupt = {"model.safetensors"}
    status, started = pull(stack, "corrupt")
    assert status == 202
    done = finished(stack, started["id"])
    assert done["status"] == "failed"
    assert "model.safetensors: checksum mismatch" in done["error"] and done["traceback"]
    assert not (models_dir(stack) / "corrupt").exists()
    assert not (models_dir(stack) / ".partial" / "corrupt").exists()


def test_a_pull_that_does_not_fit_on_disk_is_refused_with_the_numbers(stack: Stack, hub: FakeHub) -> None:
    hub.sizes = {"model.safetensors": 10**15}
    status, body = pull(stack, "huge")
    assert status == 507 and body["error"]["code"] == "insufficient_storage"
    assert "needs 1000000.00 GB" in body["error"]["message"] and "GB are free" in body["error"]["message"]
    assert not any(j["name"] == "huge" for j in http("GET", stack.admin + "/jobs")[2]["jobs"])


def test_a_cancelled_pull_leaves_nothing_behind(stack: Stack, hub: FakeHub) -> None:
    hub.slow = 100_000
    status, started = pull(stack, "cancelled")
    assert status == 202
    wait_for(lambda: job(stack, started["id"])["bytes_done"] > 0, 30, "the download to start")
    cli = stack.cli("cancel", started["id"])
    assert cli.returncode == 0 and "cancelled" in cli.stdout
    assert job(stack, started["id"])["status"] == "cancelled"
    assert not (models_dir(stack) / ".partial" / "cancelled").exists()
    assert not (models_dir(stack) / "cancelled").exists()


def test_bad_pull_requests_change_nothing(stack: Stack) -> None:
    for body in ({"repo": "../etc/passwd"}, {"repo": "acme/tiny", "revision": "../main"}, {"repo": "a b"}):
        status, _, answer = http("POST", stack.admin + "/pull", body)
        assert status == 422, (body, answer)
    status, _, answer = http("POST", stack.admin + "/pull", {"repo": "acme/tiny", "name": "Bad Name"})
    assert status == 400 and "not a valid model name" in answer["error"]["message"]
    status, _, answer = http("POST", stack.admin + "/pull", {"repo": "acme/missing", "name": "missing"})
    assert status == 400 and "acme/missing@main" in answer["error"]["message"]
    assert http("GET", stack.admin + "/jobs/pull-000000000000")[0] == 404
    assert http("GET", stack.admin + "/jobs/..%2F..%2Fetc")[0] == 404


@pytest.mark.parametrize(
    "listed", ["../escape.json", "/etc/ssw-escape.json", "a\\..\\escape.json", "x/../../escape.json"]
)
def test_a_hub_listing_a_path_outside_the_pull_is_refused_and_writes_nothing(
    stack: Stack, hub: FakeHub, listed: str
) -> None:
    hub.extra = [{"rfilename": listed, "size": 4, "blobId": "0" * 40}]
    status, body = pull(stack, "lying")
    assert status == 502 and "not safe paths" in body["error"]["message"], body
    root = models_dir(stack)
    assert not (root / "escape.json").exists() and not (root.parent / "escape.json").exists()
    assert not (root / "lying").exists() and not (root / ".partial" / "lying").exists()
    assert not any(j["name"] == "lying" for j in http("GET", stack.admin + "/jobs")[2]["jobs"])


def test_a_hub_that_sends_more_than_it_listed_fails_the_pull_at_the_listed_size(stack: Stack, hub: FakeHub) -> None:
    hub.sizes = {"model.safetensors": 1000}  # listed as 1,000 bytes; 3 MB come
    status, started = pull(stack, "oversent")
    assert status == 202
    done = finished(stack, started["id"])
    assert done["status"] == "failed"
    assert "model.safetensors" in done["error"] and "1000" in done["error"], done["error"]
    assert done["bytes_done"] <= 1000 + 2000  # config and tokenizer, and never more than listed of the weights
    assert not (models_dir(stack) / ".partial" / "oversent").exists()


def test_a_part_file_already_whole_is_verified_without_asking_the_hub(stack: Stack, hub: FakeHub) -> None:
    source = hub.repos["acme/tiny"]
    part = models_dir(stack) / ".partial" / "whole" / ".part"
    part.mkdir(parents=True)
    (part / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    hub.ranges.clear()
    hub.gets.clear()
    status, started = pull(stack, "whole")
    assert status == 202
    done = finished(stack, started["id"])
    assert done["status"] == "succeeded", done
    assert "model.safetensors" not in hub.gets and not hub.ranges  # no request for it at all
    assert (models_dir(stack) / "whole" / "model.safetensors").stat().st_size == WEIGHTS


def test_two_pulls_of_one_name_at_once_start_one_job(stack: Stack, hub: FakeHub) -> None:
    hub.slow = 1_000_000
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: pull(stack, "twice"), range(4)))
    assert sorted(status for status, _ in answers) == [202, 409, 409, 409], answers
    started = next(body for status, body in answers if status == 202)
    hub.slow = 0
    assert finished(stack, started["id"])["status"] == "succeeded"
    assert [j["name"] for j in http("GET", stack.admin + "/jobs")[2]["jobs"]].count("twice") == 1


def test_a_pull_may_not_take_an_aliass_name(stack: Stack) -> None:
    status, body = pull(stack, "light")
    assert status == 400 and "is an alias in models.yaml" in body["error"]["message"]
    assert not (models_dir(stack) / "light").exists()
