from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ssw.errors import BadRequest
from ssw.pulls import DEFAULT_PATTERNS, HubFile, PullRequest, room, select, verify


def hub_file(name: str, data: bytes, lfs: bool) -> HubFile:
    if lfs:
        return HubFile(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return HubFile(name=name, size=len(data), blob_id=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())


def test_a_model_needs_its_config_tokenizer_and_safetensors_only() -> None:
    names = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "README.md",
        "original/consolidated.pth",
        "chat_template.jinja",
    ]
    chosen = {f.name for f in select([HubFile(name=n, size=1) for n in names], DEFAULT_PATTERNS)}
    assert chosen == set(names) - {"pytorch_model.bin", "README.md", "original/consolidated.pth"}
    assert {f.name for f in select([HubFile(name=n, size=1) for n in names], ["*.bin"])} == {"pytorch_model.bin"}


@pytest.mark.parametrize(
    ("need", "free", "reserve", "ok"),
    [(10, 100, 5, True), (95, 100, 5, True), (96, 100, 5, False), (0, 0, 0, True), (1, 0, 0, False)],
)
def test_room_keeps_the_reserve_free(need: int, free: int, reserve: int, ok: bool) -> None:
    why = room(need, free, reserve)
    assert (why is None) is ok
    if why:
        assert "GB are free" in why and "pulls.min_free_gb" in why


def test_files_are_checked_against_the_hubs_sizes_and_checksums(tmp_path: Path) -> None:
    weights, config = b"\x01\x02" * 1000, b'{"model_type": "qwen2"}'
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_bytes(config)
    files = [hub_file("model.safetensors", weights, lfs=True), hub_file("config.json", config, lfs=False)]
    assert verify(tmp_path, files) == []
    (tmp_path / "model.safetensors").write_bytes(b"\x00" + weights[1:])
    (tmp_path / "config.json").write_bytes(config + b" ")
    problems = verify(tmp_path, [*files, HubFile(name="tokenizer.json", size=3)])
    assert problems[0].startswith("model.safetensors: checksum mismatch")
    assert problems[1] == f"config.json: {len(config) + 1} bytes, the hub lists {len(config)}"
    assert problems[2] == "tokenizer.json: missing"


@pytest.mark.parametrize(
    ("repo", "name", "target"),
    [("Qwen/Qwen3-4B-AWQ", None, "qwen3-4b-awq"), ("acme/tiny", "my-tiny", "my-tiny"), ("gpt2", None, "gpt2")],
)
def test_the_target_is_the_name_or_the_repos_own(repo: str, name: str | None, target: str) -> None:
    assert PullRequest(repo=repo, name=name).target() == target


def test_a_name_that_is_no_model_name_is_refused() -> None:
    with pytest.raises(BadRequest, match="not a valid model name"):
        PullRequest(repo="acme/tiny", name="Has Spaces").target()


@pytest.mark.parametrize(
    "fields",
    [{"repo": "../x"}, {"repo": "a/b/c"}, {"repo": "a", "revision": "x/../y"}, {"repo": "a", "patterns": ["/etc/*"]}],
)
def test_requests_that_could_leave_the_hub_or_the_models_dir_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PullRequest.model_validate(fields)
