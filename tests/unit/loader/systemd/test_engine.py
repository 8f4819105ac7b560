"""The vLLM command line and the worker unit, built from the registry and the config only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from ssw.common.contract import GroupRecord
from ssw.config import Config
from ssw.loader.decide.vram import GB
from ssw.loader.models.registry import ModelFacts, ModelSpec
from ssw.loader.models.spans import make_span
from ssw.loader.systemd.engine import ENTRY_POINT, RANK_PROGRAM, RankPart, sleep_enabled, vllm_argv, worker_unit
from ssw.loader.systemd.units import WorkerUnit

SOCKET = Path("/run/ssw/workers/qwen3-8b_2-0123456789/http.sock")


def spec(**kw: object) -> ModelSpec:
    facts = ModelFacts(
        num_layers=48,
        num_kv_heads=8,
        head_dim=128,
        dtype="float16",
        weight_bytes=10 * GB,
        max_position_embeddings=32768,
    )
    return ModelSpec(name="qwen3-8b", path=Path("/data/models/Qwen3-8B-AWQ"), facts=facts, **kw)  # type: ignore[arg-type]


def test_argv_is_built_from_registry_and_config_only() -> None:
    cfg = Config()
    s = spec(
        max_model_len=16384,
        tool_call_parser="hermes",
        reasoning_parser=None,
        chat_template_kwargs={"enable_thinking": False},
        extra_args=("--enforce-eager",),
    )
    argv = vllm_argv(cfg, s, SOCKET, 12 * GB, 48 * GB)
    assert argv[:3] == ["/opt/ssw/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--model /data/models/Qwen3-8B-AWQ --served-model-name qwen3-8b" in joined
    # The socket is its only listener: no --host, no --port.
    assert f"--uds {SOCKET}" in joined and "--port" not in joined and "--host" not in joined
    assert "--gpu-memory-utilization 0.2500" in joined
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in joined
    assert '--default-chat-template-kwargs {"enable_thinking": false}' in joined
    assert argv[-1] == "--enforce-eager"
    # Simulated GPUs have no memory for vLLM to check against.
    assert "--gpu-memory-utilization" not in vllm_argv(cfg, s, SOCKET, 12 * GB, None)


def test_worker_unit_pins_the_gpu_and_marks_itself() -> None:
    unit = worker_unit(
        Config(),
        spec(replicas=2),
        "ssw-worker@qwen3-8b:3.service",
        2,
        SOCKET,
        (1,),
        12 * GB,
        48 * GB,
        8 * GB,
        ("/dev/nvidia3",),
    )
    assert "--kv-cache-memory-bytes 8000000000" in " ".join(unit.argv)
    assert unit.name == "ssw-worker@qwen3-8b:3.service"
    assert unit.env["CUDA_VISIBLE_DEVICES"] == "1" and unit.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert unit.env["SSW_MODEL"] == "qwen3-8b" and unit.env["SSW_SOCKET"] == str(SOCKET)
    assert unit.env["SSW_REPLICA"] == "2" and unit.env["SSW_VRAM_BYTES"] == str(12 * GB)
    assert unit.user == "ssw-worker" and unit.socket_dir == SOCKET.parent
    # Its GPU's own device node (by minor number) and NVIDIA's control nodes, nothing else.
    assert unit.devices == ("/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
    # Compile caches survive restarts, per model; the account has no home of its own.
    assert unit.cache_directory == "ssw/qwen3-8b"
    assert unit.env["HOME"] == unit.env["XDG_CACHE_HOME"] == "/var/cache/ssw/qwen3-8b"
    assert unit.env["VLLM_CACHE_ROOT"] == "/var/cache/ssw/qwen3-8b/vllm"
    assert unit.env["HF_HUB_OFFLINE"] == "1"


def test_simulated_gpus_give_a_worker_no_device_at_all() -> None:
    unit = worker_unit(Config(), spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None)
    assert unit.devices == ()
    props = dict(unit.properties())
    assert props["DevicePolicy"] == ("s", "closed") and props["DeviceAllow"] == ("a(ss)", [])


def test_tensor_parallel_workers_see_all_their_gpus() -> None:
    unit = worker_unit(Config(), spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0, 1), 31 * GB, 48 * GB)
    assert unit.env["CUDA_VISIBLE_DEVICES"] == "0,1" and unit.env["SSW_GPU"] == "0,1"
    assert "--tensor-parallel-size 2" in " ".join(unit.argv)


def test_a_worker_gets_a_private_tmp_that_still_shows_a_program_living_there() -> None:
    unit = worker_unit(Config(), spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None)
    props = dict(unit.properties())
    assert props["PrivateTmp"] == ("b", True) and props["BindReadOnlyPaths"] == ("a(ssbt)", [])
    # A checkout under /tmp (as CI may clone one): its directory is bound into the private /tmp.
    cfg = Config.model_validate({"vllm": {"python": "/tmp/ci/.venvs/vllm/bin/python"}})
    unit = worker_unit(cfg, spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None)
    props = dict(unit.properties())
    assert props["PrivateTmp"] == ("b", True)
    assert props["BindReadOnlyPaths"] == ("a(ssbt)", [("/tmp/ci", "/tmp/ci", False, 0)])


def test_runner_and_convert_reach_vllm_and_generative_workers_keep_responses() -> None:
    generate = worker_unit(Config(), spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None)
    assert generate.env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"
    assert "--runner" not in generate.argv and "--convert" not in generate.argv
    embed = worker_unit(
        Config(), spec(runner="pooling", convert="embed"), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None
    )
    assert "--runner pooling --convert embed" in " ".join(embed.argv)
    assert "VLLM_ENABLE_RESPONSES_API_STORE" not in embed.env  # it serves no Responses
    off = Config.model_validate({"vllm": {"responses_store": False}})
    assert (
        "VLLM_ENABLE_RESPONSES_API_STORE"
        not in worker_unit(off, spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None).env
    )


def test_tracing_reaches_a_worker_only_with_worker_spans_and_opens_only_the_endpoint() -> None:
    def props(tracing: dict[str, object]) -> tuple[WorkerUnit, dict[str, object]]:
        cfg = Config.model_validate({"tracing": tracing})
        unit = worker_unit(cfg, spec(), "ssw-worker@qwen3-8b.service", 1, SOCKET, (0,), 12 * GB, None)
        return unit, {name: value[1] for name, value in unit.properties()}

    unit, p = props({"otlp_endpoint": "http://10.0.0.9:4318/v1/traces"})
    assert "--otlp-traces-endpoint" not in unit.argv and p["PrivateNetwork"] is True and "IPAddressAllow" not in p
    unit, p = props({"otlp_endpoint": "http://10.0.0.9:4318/v1/traces", "worker_spans": True})
    i = unit.argv.index("--otlp-traces-endpoint")
    assert unit.argv[i + 1] == "http://10.0.0.9:4318/v1/traces"
    assert unit.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert p["PrivateNetwork"] is False
    assert p["IPAddressDeny"] == [(2, bytes(4), 0), (10, bytes(16), 0)]  # everything else
    assert p["IPAddressAllow"] == [
        (2, bytes([127, 0, 0, 0]), 8),
        (10, bytes(15) + b"\x01", 128),
        (2, bytes([10, 0, 0, 9]), 32),
    ]
    with pytest.raises(ValidationError, match="worker_spans needs otlp_endpoint's host as an IP address"):
        Config.model_validate({"tracing": {"otlp_endpoint": "http://collector:4318/v1/traces", "worker_spans": True}})


def group_part(rank: int) -> RankPart:
    record = GroupRecord.model_validate(
        {
            "id": "0123456789abcdef",
            "model": "qwen3-8b",
            "head": "hosta",
            "master_addr": "10.0.0.2",
            "master_port": 29611,
            "members": [
                {"host": "hosta", "rank": 0, "address": "10.0.0.2"},
                {"host": "hostb", "rank": 1, "address": "10.0.0.3"},
            ],
            "at": 0.0,
        }
    )
    address = str(record.members[rank].address)
    return RankPart(make_span(2, None, 2, 2), rank, record, address, "eth1")


def test_the_ranks_of_a_model_across_hosts() -> None:
    cfg = Config()
    s = spec(span=make_span(2, None, 2, 2))
    units = {
        rank: worker_unit(
            cfg, s, "ssw-worker@qwen3-8b.service", 1, SOCKET, (0, 1), 12 * GB, None, part=group_part(rank)
        )
        for rank in (0, 1)
    }
    head, rank1 = units[0].argv, units[1].argv
    # The same engine arguments on every host but the node rank; the head serves, the other is headless.
    assert head[1:3] == ("-m", ENTRY_POINT) and rank1[1] == str(RANK_PROGRAM) and RANK_PROGRAM.is_file()
    for argv, rank in ((head, "0"), (rank1, "1")):
        text = " ".join(argv)
        assert "--tensor-parallel-size 2 --pipeline-parallel-size 2 --distributed-executor-backend mp" in text
        assert f"--nnodes 2 --node-rank {rank} --master-addr 10.0.0.2 --master-port 29611" in text
    env = units[1].env
    assert env["VLLM_HOST_IP"] == "10.0.0.3" and env["SSW_RANK"] == "1" and env["SSW_GROUP"] == "0123456789abcdef"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert units[1].description == (
        "ssw vLLM rank 1 of qwen3-8b across 2 hosts (headless; group 0123456789abcdef: hosta (head), hostb; GPU 0,1)"
    )
    # Its network: the group's hosts and loopback, nothing else.
    p = {name: value[1] for name, value in units[1].properties()}
    assert p["PrivateNetwork"] is False
    assert p["IPAddressAllow"] == [
        (2, bytes([127, 0, 0, 0]), 8),
        (10, bytes(15) + b"\x01", 128),
        (2, bytes([10, 0, 0, 2]), 32),
        (2, bytes([10, 0, 0, 3]), 32),
    ]
    # Never sleep mode: the other hosts' ranks would keep their memory counted.
    assert "--enable-sleep-mode" not in head and not sleep_enabled(dataclasses.replace(s, sleep=True), "nvml")
