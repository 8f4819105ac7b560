"""A/B splits on real systemd with the fake engine: an alias whose traffic goes to two
models by weight, each end user (or API key) staying on one; the answer names the
model that served; a model of the split that cannot serve gives its share away."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {
    "ab-a": {"path": "fake-a", "vram_gb": 1, "pinned": True},
    "ab-b": {"path": "fake-b", "vram_gb": 1, "pinned": True},
    "ab-broken": {"path": "fake-b", "vram_gb": 1, "env": {"SSW_FAKE_FAIL": "exit-on-start"}},
}
SPLITS = {
    "npc": {"models": {"ab-a": 80, "ab-b": 20}, "sticky": "user"},
    "per-key": {"models": {"ab-a": 1, "ab-b": 1}, "sticky": "key"},
    "shaky": {"models": {"ab-a": 1, "ab-broken": 1}, "sticky": "user"},
}
REQUESTS = 300
# 80 % of 300 users: a binomial standard deviation of 2.3 points; 8 points is 3.5 of them.
TOLERANCE = 0.08


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path) -> Iterator[Stack]:
    extra = {"auth": {"enabled": True}, "placement": {"failed_load_cooldown_s": 60}}
    s = start_stack(sysbox, WORK_ROOT / f"splits-{id(sysbox)}", models_root, MODELS, "fake", extra, splits=SPLITS)
    wait_for(
        lambda: {w["model"] for w in s.status()["workers"] if w["state"] == "ready"} >= {"ab-a", "ab-b"},
        60,
        "the split's models",
    )
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def keys(stack: Stack) -> list[str]:
    out = [stack.add_key(f"k{i}") for i in range(4)]
    wait_for(lambda: chat(stack, out[-1], "ab-a")[0] == 200, 10, "the keys")
    return out


def chat(stack: Stack, key: str, model: str, user: str | None = None) -> tuple[int, dict[str, str], dict]:
    body = {"model": model, "messages": CHAT, "max_tokens": 2, **({"user": user} if user else {})}
    status, headers, answer = http(
        "POST", stack.public + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}
    )
    return status, headers, answer


def test_users_spread_by_weight_and_each_stays_on_one_model(stack: Stack, keys: list[str]) -> None:
    served: dict[str, str] = {}
    for i in range(REQUESTS):
        status, _, body = chat(stack, keys[i % len(keys)], "npc", f"player-{i}")
        assert status == 200, body
        served[f"player-{i}"] = body["model"]
    share = Counter(served.values())["ab-a"] / REQUESTS
    print(f"npc: {share:.3f} of {REQUESTS} users on ab-a (80 % asked)")
    assert abs(share - 0.8) <= TOLERANCE and set(served.values()) == {"ab-a", "ab-b"}
    for user in list(served)[:20]:  # the same user, whichever key: the same model
        assert chat(stack, keys[-1], "npc", user)[2]["model"] == served[user]
    listed = {
        m["id"]: m
        for m in http("GET", stack.public + "/v1/models", headers={"Authorization": f"Bearer {keys[0]}"})[2]["data"]
    }
    assert listed["npc"]["ssw"] == {"split_of": {"ab-a": 80.0, "ab-b": 20.0}, "sticky": "user"}


def test_a_key_sticks_to_one_model_of_a_key_split(stack: Stack, keys: list[str]) -> None:
    for key in keys:
        models = {chat(stack, key, "per-key", f"anyone-{i}")[2]["model"] for i in range(5)}
        assert len(models) == 1  # its users do not matter: the key decides


def test_a_model_of_the_split_that_cannot_serve_gives_its_share_to_the_others(stack: Stack, keys: list[str]) -> None:
    # Asked for directly, the broken model fails its load and cools down.
    status, _, body = chat(stack, keys[0], "ab-broken")
    assert status == 503, body
    wait_for(
        lambda: stack.status()["models"]["ab-broken"]["load"]["state"] == "cooling_down", 30, "ab-broken's cooldown"
    )
    models = {chat(stack, keys[0], "shaky", f"gamer-{i}")[2].get("model") for i in range(30)}
    assert models == {"ab-a"}
