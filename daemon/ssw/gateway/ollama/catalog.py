"""What Ollama's listing routes answer, from the gateway's view of the loader (pure):
/api/tags (every model and alias on disk, within the key's scope), /api/ps (what is
loaded or asleep, the VRAM it holds, when it expires) and /api/show (a model's
details, capabilities, context length and chat template). Sizes, families,
parameter counts and quantization are what the registry read from each model's
files."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection
from typing import Any

from ssw.common.contract import ModelView, WorkerView
from ssw.common.routes import Family
from ssw.common.states import ASLEEP, WorkerState
from ssw.gateway.ollama.answers import created_at

FOREVER = "2318-08-12T00:00:00Z"  # what Ollama answers for a model kept without end


def tagged(name: str) -> str:
    """A name as Ollama lists it: with its tag (``:latest`` when it has none)."""
    return name if ":" in name else f"{name}:latest"


def untagged(name: str) -> str:
    """A name as ssw knows it: ``:latest`` means the name alone."""
    return name.removesuffix(":latest")


def parameter_size(n: int | None) -> str:
    if not n:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def _digest(name: str, view: ModelView) -> str:
    # Ollama names each model's content by a digest; ssw's stand-in changes with the files.
    seed = f"{name}|{view.details.weight_bytes}|{view.details.modified_at}".encode()
    return hashlib.sha256(seed).hexdigest()


def details(view: ModelView) -> dict[str, Any]:
    d = view.details
    return {
        "parent_model": view.base or "",
        "format": "safetensors",
        "family": d.family or "",
        "families": [d.family] if d.family else None,
        "parameter_size": parameter_size(d.parameters),
        "quantization_level": (d.quantization or d.dtype or "").upper(),
    }


def capabilities(view: ModelView) -> list[str]:
    families = set(view.capabilities)
    out = []
    if Family.CHAT.value in families or Family.COMPLETIONS.value in families:
        out.append("completion")
    if Family.CHAT.value in families:
        out.append("tools")
        if view.chat_template_kwargs.get("enable_thinking") is not None or (view.details.family or "") in (
            "qwen3",
            "qwen3_moe",
        ):
            out.append("thinking")
    if Family.EMBEDDINGS.value in families:
        out.append("embedding")
    if view.details.vision:
        out.append("vision")
    return out


def _entry(name: str, view: ModelView) -> dict[str, Any]:
    return {
        "name": tagged(name),
        "model": tagged(name),
        "modified_at": created_at(view.details.modified_at),
        "size": view.details.weight_bytes,
        "digest": _digest(name, view),
        "details": details(view),
    }


def tags(models: dict[str, ModelView], aliases: dict[str, str], allowed: Collection[str] | None) -> dict[str, Any]:
    out = []
    for name, view in sorted(models.items()):
        if allowed is None or name in allowed:
            out.append(_entry(name, view))
    for alias, target in sorted(aliases.items()):
        if target in models and (allowed is None or target in allowed):
            out.append(_entry(alias, models[target]))
    return {"models": out}


def ps(
    models: dict[str, ModelView],
    workers: list[WorkerView],
    allowed: Collection[str] | None,
    snapshot_at: float,
    last_used: Callable[[str], float | None],
) -> dict[str, Any]:
    """``snapshot_at``: the wall time of the snapshot whose idle times these are."""
    out = []
    for w in workers:
        view = models.get(w.model)
        if view is None or (allowed is not None and w.model not in allowed):
            continue
        if w.state not in (WorkerState.READY, *ASLEEP):
            continue
        ttl = view.idle_ttl_s
        if ttl is None or ttl < 0:
            expires = FOREVER
        else:
            idle_since = max(snapshot_at - w.idle_s, last_used(w.unit) or 0.0)
            expires = created_at(max(idle_since + ttl, time.time()))
        entry = _entry(w.model, view)
        out.append(
            entry
            | {
                "expires_at": expires,
                "size_vram": 0 if w.state in ASLEEP else (w.vram_measured_bytes or w.vram_budget_bytes),
                "context_length": view.details.context_length or 0,
            }
        )
    return {"models": out}


def show(name: str, view: ModelView) -> dict[str, Any]:
    d = view.details
    family = d.family or "unknown"
    info: dict[str, Any] = {"general.architecture": family}
    if d.parameters:
        info["general.parameter_count"] = d.parameters
    if d.context_length:
        info[f"{family}.context_length"] = d.context_length
    return {
        "modelfile": f"# ssw serves {name} with vLLM; it has no Modelfile\nFROM {name}\n",
        "parameters": "",
        "template": d.chat_template or "",
        "details": details(view),
        "model_info": info,
        "capabilities": capabilities(view),
        "modified_at": created_at(d.modified_at),
    }
