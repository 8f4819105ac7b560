"""Every series ssw exports is in the README's table, with its labels."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ssw.batch.metrics import BatchMetrics
from ssw.gateway.metrics import GatewayMetrics
from ssw.loader.gpus import GpuInfo
from ssw.loader.metrics import LoaderMetrics
from tests.harness.stack import REPO

# Labels every family may have without the table saying so (histograms' le, a fleet's host).
IMPLIED = {"le", "host"}


def exported() -> dict[str, set[str]]:
    """Family name (as exposed: counters with _total) -> its labels, with one sample each."""
    gateway = GatewayMetrics()
    gateway.requests.labels("m", "200", "/v1/chat/completions").inc()
    for h in (gateway.duration, gateway.ttft, gateway.load_wait):
        h.labels("m", "realtime").observe(0.1)
    gateway.waiting.labels("m", "batch").set(1)
    gateway.prompt_tokens.labels("m").inc()
    gateway.completion_tokens.labels("m").inc()
    gpu = GpuInfo(0, "u", "n", 1, 0, 1, temperature_c=40, power_w=100.0)
    loader = LoaderMetrics(lambda: {"ready": 1}, lambda: 0, lambda: [gpu], lambda: {})
    loader.loads.labels("m", "ready").inc()
    loader.load_duration.labels("m").observe(1)
    loader.known_answer_failures.labels("m", "wake").inc()
    loader.load_phase.labels("m", "placement").observe(1)
    for h in (loader.wake, loader.sleep):
        h.labels("m", "1").observe(1)
    loader.residency.labels("m").observe(1)
    loader.retirements.labels("m", "idle").inc()
    loader.failures.labels("m", "ready").inc()
    loader.load_setbacks.labels("m", "cooling_down").inc()
    loader.check_failures.labels("m", "canary").inc()
    registry = CollectorRegistry()
    batch = BatchMetrics(registry)
    batch.lines.labels("m", "failed").inc()
    for g in (batch.queued, batch.running):
        g.labels("m").set(1)
    batch.yields.labels("m").inc()
    text = (gateway.render() + loader.render() + generate_latest(registry)).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        # (the classic text format shows each counter's and histogram's creation time apart)
        if not family.name.startswith("ssw_") or family.name.endswith("_created"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = {label for s in family.samples for label in s.labels} - IMPLIED
    return out


def test_the_readme_lists_every_series_with_its_labels() -> None:
    readme = (REPO / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`ssw_"):
            labels = {x.strip() for x in cells[1].split(",") if x.strip()}
            for name in re.findall(r"`(ssw_[a-z_]+)`", cells[0]):
                rows[name] = labels
    found = exported()
    assert len(found) >= 30
    missing = sorted(set(found) - set(rows))
    assert not missing, f"series not in the README's table: {missing}"
    wrong = {n: (sorted(found[n]), sorted(rows[n])) for n in found if found[n] != rows[n]}
    assert not wrong, f"labels differ (exported, README): {wrong}"
