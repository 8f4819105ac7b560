"""What the loader keeps on disk across its restarts, under ``state_dir``:
facts measured per model (``models.json``: the VRAM a healthy worker really
held, how long its loads and wakes took, per sleep level), and the workers it was taking down
(``retiring.json``), so that a restarted loader finishes the job."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ssw.common.probes import KnownAnswer

log = logging.getLogger(__name__)
KEEP_LOAD_TIMES = 10


class FactStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._facts: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file (blocking; call once at start, in a thread)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            self._facts = {k: v for k, v in data["models"].items() if isinstance(v, dict)}

    def vram_bytes(self, model: str) -> int | None:
        value = self._facts.get(model, {}).get("vram_bytes")
        return int(value) if isinstance(value, int) and value > 0 else None

    def load_seconds(self, model: str) -> float | None:
        """The median of the recent load times, or None when the model never loaded here."""
        times = [t for t in self._facts.get(model, {}).get("load_seconds", []) if isinstance(t, (int, float))]
        return float(statistics.median(times)) if times else None

    def wake_seconds(self, model: str, level: int | None = None) -> float | None:
        """The median of the recent wakes from this sleep level (any level: None), or None."""
        by_level = self._facts.get(model, {}).get("wake_seconds", {})
        if not isinstance(by_level, dict):
            return None
        lists = [v for k, v in by_level.items() if level is None or k == str(level)]
        times = [t for v in lists if isinstance(v, list) for t in v if isinstance(t, (int, float))]
        return float(statistics.median(times)) if times else None

    async def record(self, model: str, vram_bytes: int | None, load_seconds: float) -> None:
        async with self._lock:
            entry = self._facts.setdefault(model, {})
            if vram_bytes:
                entry["vram_bytes"] = vram_bytes
            entry["load_seconds"] = [*entry.get("load_seconds", []), round(load_seconds, 2)][-KEEP_LOAD_TIMES:]
            entry["updated_at"] = time.time()
            await self._save()

    async def record_routes(self, model: str, fingerprint: str, routes: set[str]) -> None:
        """The inference routes a worker of the model mounted, with the model's fingerprint."""
        async with self._lock:
            entry = self._facts.setdefault(model, {})
            entry["routes_fingerprint"], entry["routes"] = fingerprint, sorted(routes)
            entry["updated_at"] = time.time()
            await self._save()

    async def record_wake(self, model: str, level: int, seconds: float) -> None:
        async with self._lock:
            entry = self._facts.setdefault(model, {})
            by_level = entry.setdefault("wake_seconds", {})
            by_level[str(level)] = [*by_level.get(str(level), []), round(seconds, 3)][-KEEP_LOAD_TIMES:]
            entry["updated_at"] = time.time()
            await self._save()

    async def record_cold_start(self, model: str, options: str, seconds: float) -> None:
        """A cold start measured with these start options (canonical JSON; "{}": as configured)."""
        async with self._lock:
            entry = self._facts.setdefault(model, {})
            trials = entry.setdefault("cold_starts", {})
            trials[options] = [*trials.get(options, []), round(seconds, 2)][-KEEP_LOAD_TIMES:]
            entry["updated_at"] = time.time()
            await self._save()

    def cold_starts(self, model: str) -> dict[str, float]:
        """The median measured cold start per option set."""
        trials = self._facts.get(model, {}).get("cold_starts", {})
        if not isinstance(trials, dict):
            return {}
        out = {}
        for options, times in trials.items():
            values = [t for t in times if isinstance(t, (int, float))] if isinstance(times, list) else []
            if values:
                out[options] = float(statistics.median(values))
        return out

    async def _save(self) -> None:
        payload = json.dumps({"models": self._facts}, indent=1, sort_keys=True)
        try:
            await asyncio.to_thread(_write_atomic, self.path, payload)
        except OSError as exc:
            log.warning("cannot save measured facts to %s: %s", self.path, exc)

    def routes(self, model: str, fingerprint: str) -> set[str] | None:
        """The inference routes a worker of the model mounted, if one ran with this
        fingerprint (models.yaml and the directory unchanged since)."""
        entry = self._facts.get(model, {})
        routes = entry.get("routes")
        if entry.get("routes_fingerprint") != fingerprint or not isinstance(routes, list):
            return None
        return {r for r in routes if isinstance(r, str)}

    # --- the known-answer check ------------------------------------------------------------

    def known_answer(self, model: str, fingerprint: str) -> KnownAnswer | None:
        """The greedy answer recorded on the model's first healthy start, with this fingerprint."""
        entry = self._facts.get(model, {}).get("known_answer")
        if not isinstance(entry, dict) or entry.get("fingerprint") != fingerprint:
            return None
        text, logprobs = entry.get("text"), entry.get("logprobs")
        if not isinstance(text, str) or not isinstance(logprobs, list):
            return None
        return KnownAnswer(text, tuple(float(x) for x in logprobs if isinstance(x, int | float)))

    async def record_known_answer(self, model: str, fingerprint: str, answer: KnownAnswer) -> None:
        async with self._lock:
            entry = self._facts.setdefault(model, {})
            entry["known_answer"] = {"fingerprint": fingerprint, "text": answer.text, "logprobs": list(answer.logprobs)}
            entry["updated_at"] = time.time()
            await self._save()

    async def known_answer_failed(self, model: str, why: str, block_sleep: bool) -> None:
        """A worker answered wrongly: counted, and (after a wake) the model sleeps no more
        until an operator clears it."""
        async with self._lock:
            entry = self._facts.setdefault(model, {})
            entry["known_answer_failures"] = int(entry.get("known_answer_failures", 0)) + 1
            entry["known_answer_last_failure"] = why
            if block_sleep:
                entry["sleep_blocked"] = why
            entry["updated_at"] = time.time()
            await self._save()

    def sleep_blocked(self, model: str) -> str | None:
        """Why the model may not sleep (its known answer differed after a wake), if so."""
        why = self._facts.get(model, {}).get("sleep_blocked")
        return why if isinstance(why, str) else None

    async def clear_known_answer(self, model: str) -> bool:
        """An operator's all-clear: the recorded answer is dropped (the next start records
        one anew) and the model may sleep again. False: there was nothing to clear."""
        async with self._lock:
            entry = self._facts.get(model, {})
            had = any(k in entry for k in ("known_answer", "sleep_blocked", "known_answer_last_failure"))
            for k in ("known_answer", "sleep_blocked", "known_answer_last_failure"):
                entry.pop(k, None)
            if had:
                await self._save()
            return had

    def known_answer_status(self, model: str) -> dict[str, Any]:
        entry = self._facts.get(model, {})
        return {
            "recorded": isinstance(entry.get("known_answer"), dict),
            "failures": int(entry.get("known_answer_failures", 0)),
            "last_failure": entry.get("known_answer_last_failure"),
            "sleep_blocked": self.sleep_blocked(model),
        }

    def public(self, model: str) -> dict[str, Any]:
        return {
            "measured_vram_bytes": self.vram_bytes(model),
            "load_seconds": self.load_seconds(model),
            "wake_seconds": self.wake_seconds(model),
        }


class Retiring:
    """Units ssw has begun to take down (drain, then stop), with the reason."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._units: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file (blocking; call once at start, in a thread)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return
        if isinstance(data, dict):
            self._units = {str(k): str(v) for k, v in data.items()}

    def reason(self, unit: str) -> str | None:
        return self._units.get(unit)

    async def add(self, unit: str, reason: str) -> None:
        if self._units.get(unit) != reason:
            self._units[unit] = reason
            await self._save()

    async def discard(self, unit: str) -> None:
        if self._units.pop(unit, None) is not None:
            await self._save()

    async def keep_only(self, units: set[str]) -> None:
        """Forget units that no longer exist."""
        if set(self._units) - units:
            self._units = {u: r for u, r in self._units.items() if u in units}
            await self._save()

    async def _save(self) -> None:
        async with self._lock:
            payload = json.dumps(self._units, indent=1, sort_keys=True)
            try:
                await asyncio.to_thread(_write_atomic, self.path, payload)
            except OSError as exc:
                log.warning("cannot save %s: %s", self.path, exc)


def _write_atomic(path: Path, payload: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(payload)
    os.replace(tmp, path)  # readers never see half a file
