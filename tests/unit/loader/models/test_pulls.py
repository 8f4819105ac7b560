from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ssw.errors import BadRequest, ModelBusy
from ssw.loader.models.pulls import (
    DEFAULT_PATTERNS,
    HubFile,
    Job,
    Puller,
    PullFailed,
    PullRequest,
    Settings,
    _get,
    inside,
    room,
    select,
    unsafe_name,
    verify,
)
from tests.harness.fake_hub import FakeHub


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


def test_patterns_match_path_components_so_star_never_crosses_a_folder() -> None:
    names = ["config.json", "sub/config.json", "a/b/model.safetensors", "model.safetensors", ".cache/x.json"]
    files = [HubFile(name=n, size=1) for n in names]
    assert {f.name for f in select(files, DEFAULT_PATTERNS)} == {"config.json", "model.safetensors"}
    assert {f.name for f in select(files, ["sub/*.json"])} == {"sub/config.json"}
    assert {f.name for f in select(files, ["*/*/*.safetensors"])} == {"a/b/model.safetensors"}
    # A hidden component is never fetched: the pull keeps its own state (.part) in dot names.
    assert select(files, ["*/*.json", ".cache/*"]) == [files[1]]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../escape.json", "'..'"),
        ("a/../../b.json", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a\\..\\b.json", "backslash"),
        ("a\0b.json", "NUL"),
        ("a//b.json", "empty"),
        ("./config.json", "'.'"),
        ("", "empty"),
        ("x" * 1025, "1024"),
    ],
)
def test_names_a_hub_lists_outside_the_pull_are_unsafe(name: str, why: str) -> None:
    reason = unsafe_name(name)
    assert reason is not None and why in reason


@pytest.mark.parametrize("name", ["config.json", "sub/dir/model.safetensors", "tokenizer..json", "a.b/c"])
def test_ordinary_names_are_safe(name: str) -> None:
    assert unsafe_name(name) is None


def test_a_link_planted_in_the_partial_directory_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "partial"
    root.mkdir()
    (root / "evil").symlink_to(tmp_path)
    assert inside(root, "ok/config.json") == root / "ok" / "config.json"
    with pytest.raises(PullFailed, match="outside"):
        inside(root, "evil/config.json")


def fake_job(total: int, done: int, job_id: str) -> Job:
    return Job(id=job_id, repo="a/b", revision="main", name=job_id, created_at="x", bytes_total=total, bytes_done=done)


def test_what_running_pulls_still_have_to_write_is_not_free(tmp_path: Path) -> None:
    puller = Puller(Settings(tmp_path, None, None, 0), redis=None)  # type: ignore[arg-type]
    running, finished = fake_job(1000, 300, "run"), fake_job(5000, 0, "old")
    puller._jobs = {"run": running, "old": finished}
    puller._tasks = {"run": None}  # type: ignore[dict-item]
    assert puller._to_write() == 700


async def test_a_name_taken_by_an_alias_or_a_running_pull_is_refused_before_the_hub_is_asked(tmp_path: Path) -> None:
    puller = Puller(
        Settings(tmp_path, None, None, 0),
        redis=None,  # type: ignore[arg-type]
        taken=lambda name: "is an alias in models.yaml" if name == "light" else None,
    )
    with pytest.raises(BadRequest, match="alias"):
        await puller.start(PullRequest(repo="acme/tiny", name="light"))
    puller._claimed.add("busy")
    with pytest.raises(ModelBusy, match="already under way"):
        await puller.start(PullRequest(repo="acme/tiny", name="busy"))
    assert puller._claimed == {"busy"}  # a refused pull claims nothing


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[FakeHub, bytes]]:
    data = bytes(range(256)) * 40
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(data)
    server = FakeHub({"acme/tiny": repo}).start()
    yield server, data
    server.stop()


async def test_a_416_whose_total_is_the_listed_size_means_the_file_is_whole(hub: tuple[FakeHub, bytes]) -> None:
    server, data = hub
    url = f"{server.url}/acme/tiny/resolve/main/model.safetensors"
    async with aiohttp.ClientSession() as session:
        async with _get(session, url, None, len(data), len(data), allow_http=True) as resp:
            assert resp is None
        # Any other 416 (the file is not what the listing says) fails the pull.
        with pytest.raises(PullFailed, match="HTTP 416"):
            async with _get(session, url, None, len(data) + 5, len(data) + 5, allow_http=True):
                pass
        # A hub that offers more than it listed is refused before a byte is written.
        with pytest.raises(PullFailed, match="offers"):
            async with _get(session, url, None, 0, 10, allow_http=True):
                pass
        with pytest.raises(PullFailed, match="only https"):
            async with _get(session, url, None, 0, len(data), allow_http=False):
                pass
    assert server.ranges == [f"model.safetensors: bytes={len(data)}-", f"model.safetensors: bytes={len(data) + 5}-"]
