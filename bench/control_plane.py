"""Scale of ssw's control plane, in-process and without a stack:

- the registry scan of N model directories (config.json + sparse weights);
- placement and eviction decisions with G GPUs and M resident models.

    python bench/control_plane.py [--models 1000] [--gpus 8] [--residents 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ssw.errors import NoCapacity
from ssw.loader.decide.placement import DeviceView, Resident, place
from ssw.loader.decide.vram import GB, VramNeed
from ssw.loader.models.registry import scan

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}


def bench_scan(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("SSW_BENCH_TMP")) as tmp:
        root = Path(tmp)
        for i in range(n):
            d = root / f"model-{i:05d}"
            d.mkdir()
            (d / "config.json").write_text(json.dumps(CONFIG))
            with (d / "model.safetensors").open("wb") as f:
                f.truncate(random.randint(1, 30) * GB)  # sparse: costs no disk
        times = []
        for _ in range(3):
            started = time.perf_counter()
            reg = scan(root, root / "models.yaml")
            times.append(time.perf_counter() - started)
        assert len(reg.models) == n
    return {"models": n, "scan_s_median": round(statistics.median(times), 4)}


def bench_place(gpus: int, residents: int, decisions: int) -> dict[str, float]:
    rng = random.Random(1)
    used = [0] * gpus
    res = []
    for j in range(residents):
        g = j % gpus
        held = rng.randint(2, 8) * GB
        used[g] += held
        res.append(Resident(f"w{j}", (g,), held, rng.random() * 1e6, rng.random() > 0.2, rng.random() * 60))
    # Full GPUs (80 GB or what their workers hold): most decisions must evict.
    devices = [DeviceView(g, max(used[g], 80 * GB), used[g], 0) for g in range(gpus)]
    needs = [VramNeed(rng.randint(4, 40) * GB, int(0.95 * GB), None, "estimate") for _ in range(decisions)]
    evictions = refused = 0
    started = time.perf_counter()
    for need in needs:
        try:
            evictions += len(place(need, devices, res).evict)
        except NoCapacity:
            refused += 1
    took = time.perf_counter() - started
    return {
        "gpus": gpus,
        "residents": len(res),
        "decisions": decisions,
        "per_decision_us": round(took / decisions * 1e6, 1),
        "evictions": evictions,
        "refused": refused,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--residents", type=int, default=100)
    p.add_argument("--decisions", type=int, default=2000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    result = {"scan": bench_scan(args.models), "placement": bench_place(args.gpus, args.residents, args.decisions)}
    s, pl = result["scan"], result["placement"]
    print(f"registry scan of {s['models']} model directories: {s['scan_s_median'] * 1000:.0f} ms (median of 3)")
    print(
        f"placement with {pl['gpus']} GPUs and {pl['residents']} resident workers: {pl['per_decision_us']} µs "
        f"per decision ({pl['decisions']} decisions, {pl['evictions']} evictions chosen, {pl['refused']} refused)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
