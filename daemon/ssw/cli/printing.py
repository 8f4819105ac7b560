"""What the CLI prints for people (``--json`` prints the data instead)."""

from __future__ import annotations

import time
from typing import Any

from ssw.common.contract import Status


def gb(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.1f} GB"


def bar(used: int, reserved: int, total: int, width: int = 24) -> str:
    """[######++......] : '#' in use, '+' reserved by loads in flight, '.' free."""
    if total <= 0:
        return ""
    u = min(round(used / total * width), width)
    r = min(round(reserved / total * width), width - u)
    return "[" + "#" * u + "+" * r + "." * (width - u - r) + "]"


def when(deadline: float | None) -> str:
    if deadline is None:
        return ""
    left = deadline - time.time()
    return f" until {time.strftime('%H:%M:%S', time.localtime(deadline))} ({max(left, 0):.0f} s)"


def print_status(st: Status) -> None:
    print(
        f"ssw {st.ssw_version}  up {st.uptime_s:.0f} s  GPU source: {st.gpu_source}  "
        f"placement: {st.placement_policy}  evictions: {st.evictions_total}"
    )
    for g in st.gpus:
        util = "unknown" if g.utilization_pct is None else f"{g.utilization_pct} %"
        meter = bar(g.memory_used_bytes, g.memory_reserved_bytes, g.memory_total_bytes)
        releasing = f", releasing {gb(g.memory_releasing_bytes)}" if g.memory_releasing_bytes else ""
        print(
            f"  GPU {g.index} {g.name}{' (simulated)' if g.simulated else ''} {meter} "
            f"total {gb(g.memory_total_bytes)}, used {gb(g.memory_used_bytes)}, "
            f"reserved {gb(g.memory_reserved_bytes)}{releasing}, free {gb(g.memory_free_bytes)}, util {util}"
        )
    print("workers:" if st.workers else "workers: none")
    for w in st.workers:
        gpus = ",".join(str(g) for g in w.gpus)
        print(
            f"  {w.unit}: {w.state.value} on GPU {gpus} for {w.state_for_s:.0f} s, budget {gb(w.vram_budget_bytes)}, "
            f"measured {gb(w.vram_measured_bytes)}, up {w.uptime_s:.0f} s, idle {w.idle_s:.0f} s"
            + (", pinned" if w.pinned else "")
            + (f", asleep at level {w.sleep_level or '?'}" if w.state == "sleeping" else "")
            + (f", host memory {gb(w.ram_bytes)}" if w.state == "sleeping" and w.ram_bytes else "")
            + (f", adapters {', '.join(w.adapters)}" if w.adapters else "")
        )
        if w.group:
            print(f"    rank {w.rank} ({'head, serving' if w.rank == 0 else 'headless'}) of group {w.group}")
        if w.state_reason:
            print(f"    {w.state_reason}")
    print("models:")
    for name, m in st.models.items():
        rec = m.load
        flags = ", ".join(filter(None, ["pinned" if m.pinned else "", "" if rec.state == "idle" else rec.state]))
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        print(f"  {name}{aliases}{' [' + flags + ']' if flags else ''}")
        load = "unknown" if m.load_seconds is None else f"{m.load_seconds:.0f} s"
        print(
            f"    needs {gb(m.vram_need_bytes)} per GPU ({m.vram_need_source}), "
            f"measured {gb(m.measured_vram_bytes)}, load time {load}"
        )
        if rec.state != "idle":
            print(f"    load {rec.state.value}{when(rec.deadline)}: {rec.reason}")
        if rec.progress is not None:
            p = rec.progress.describe(time.time())
            eta = (
                "no ETA yet (first load here)" if p["eta_s"] is None else f"ETA {p['eta_s']} s of ~{p['expected_s']} s"
            )
            print(f"    {p['kind']} in progress: {p['phase'].replace('_', ' ')}, {p['elapsed_s']} s, {eta}")
        if rec.last_error:
            print(f"    last error: {rec.last_error}")
    for name, path in st.missing.items():
        print(f"  {name}: configured, files missing at {path}")


def print_stats(st: dict[str, Any]) -> None:
    print(f"last {st['window_s']:.0f} s")
    if not st["models"]:
        print("  no requests")
    for name, m in st["models"].items():
        lat, ttft = m["latency_ms"], m["ttft_ms"]
        print(
            f"  {name}: {m['requests']} requests, {m['errors']} errors ({m['error_rate'] * 100:.1f} %), "
            f"latency p50/p95/p99 {lat['p50']}/{lat['p95']}/{lat['p99']} ms, "
            f"TTFT p50/p95/p99 {ttft['p50']}/{ttft['p95']}/{ttft['p99']} ms, "
            f"tokens/s in {m['prompt_tokens_per_s']} out {m['completion_tokens_per_s']}"
        )


def print_fleet(out: dict[str, Any]) -> None:
    now = time.time()
    for name, h in out["hosts"].items():
        print(f"{name}  {h['url']}  heard {now - h['at']:.1f} s ago")
        for g in h["gpus"]:
            used = g["memory_total_bytes"] - g["memory_free_bytes"]
            print(
                f"  GPU {g['index']} {g['name']}: {bar(used, 0, g['memory_total_bytes'])} "
                f"{gb(used)}/{gb(g['memory_total_bytes'])}"
            )
        for w in h["workers"]:
            group = f"  rank {w['rank']} of group {w['group']}" if w.get("group") else ""
            print(f"  {w['unit']:<40} {w['state']:<10} GPU {','.join(map(str, w['gpus']))}{group}")
        if not h["workers"]:
            print("  (no workers)")
