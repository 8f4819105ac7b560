"""The model registry: what is on disk under the models dir, merged with the
operator's ``models.yaml``, with aliases resolved.

Scanning reads files and is meant to run in a thread; everything else here is
pure and works on the resulting :class:`Registry` snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from ssw.common.contract import NAME_RE, valid_name
from ssw.errors import ConfigError, ModelNotFound
from ssw.loader.models.capabilities import Shape
from ssw.loader.models.overrides import ModelOverride, ModelsFile
from ssw.loader.models.spans import Span, shape_problem
from ssw.loader.models.splits import check_splits

log = logging.getLogger(__name__)

MAX_SCAN_DEPTH = 2  # models_dir/<model> and models_dir/<org>/<model>
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
ADAPTER_CONFIG = "adapter_config.json"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM 0.32 accepts as --max-lora-rank
DEFAULT_MAX_LORAS = 4


@dataclass(frozen=True)
class ModelFacts:
    """What config.json and the weight files say; None where they do not say."""

    architectures: tuple[str, ...] = ()
    model_type: str | None = None
    quantization: str | None = None
    dtype: str | None = None
    num_layers: int | None = None
    num_heads: int | None = None  # attention heads
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    weight_bytes: int = 0
    num_labels: int | None = None  # a classifier's outputs (1: a cross-encoder that scores)
    sentence_transformers: bool = False  # modules.json: vLLM pools such a directory
    modified_at: float | None = None  # config.json's mtime
    vision: bool = False  # config.json has a vision_config: the model takes images
    chat_template: str | None = None  # tokenizer_config.json's (a string of at most MAX_TEMPLATE_CHARS)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    facts: ModelFacts
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    vram_gb: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    replicas: int = 1
    env: dict[str, str] = field(default_factory=dict)
    gpus: tuple[int, ...] | None = None
    max_tokens: int | None = None
    fallbacks: tuple[str, ...] = ()
    fallback_default: bool = False
    scheduling_policy: str | None = None
    python: Path | None = None
    runner: str = "auto"
    convert: str = "auto"
    sleep: Literal["auto"] | bool = "auto"
    idle_ttl_s: float | None = None
    preload: bool = False
    enforce_eager: bool | None = None
    load_format: str | None = None
    compilation_config: dict[str, Any] | None = None
    base: str | None = None  # a LoRA adapter: the model whose workers serve it
    lora_rank: int | None = None  # an adapter's rank (adapter_config.json's r)
    # A base model with adapters: (max_loras, max_lora_rank) for vLLM; None: LoRA off.
    lora: tuple[int, int] | None = None
    span: Span | None = None  # across hosts (models.yaml hosts: 2 or more); None: on one host

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def shape(self) -> Shape:
        f = self.facts
        return Shape(f.architectures, f.sentence_transformers, f.num_labels, self.runner, self.convert)

    @property
    def fingerprint(self) -> str:
        """What decides the routes its workers mount: measured routes hold while it is unchanged."""
        return json.dumps(
            [list(self.facts.architectures), self.runner, self.convert, list(self.extra_args), str(self.python or "")]
        )


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    aliases: dict[str, str]
    # Configured in models.yaml but with no files on this host: name -> expected path.
    missing: dict[str, Path] = field(default_factory=dict)
    # Every alias models.yaml names, also those of missing models: no directory may take one.
    configured_aliases: frozenset[str] = frozenset()
    # A/B splits: name -> (model -> share, who sticks: "key" or "user"); models present here only.
    splits: dict[str, tuple[dict[str, float], str]] = field(default_factory=dict)

    def name_taken(self, name: str) -> str | None:
        """Why a new model directory may not be called ``name``, or None."""
        if name in self.configured_aliases:
            return "is an alias in models.yaml"
        if name in self.models or name in self.missing:
            return "is a model's name already"
        return None

    def known_names(self) -> list[str]:
        return sorted(self.models) + sorted(self.aliases)

    def resolve(self, name: str) -> ModelSpec:
        """The model a name or alias means; ModelNotFound (listing the alternatives) otherwise."""
        spec = self.models.get(name)
        if spec is None and name in self.aliases:
            spec = self.models.get(self.aliases[name])
        if spec is None:
            raise ModelNotFound(name, self.known_names())
        return spec


# --- family defaults -------------------------------------------------------------


def family_defaults(name: str, facts: ModelFacts) -> dict[str, Any]:
    """Parser and chat-template defaults by model family; models.yaml overrides them."""
    model_type = (facts.model_type or "").lower()
    archs = " ".join(facts.architectures).lower()
    lowered = name.lower() + " " + archs
    out: dict[str, Any] = {}
    if model_type.startswith("qwen") or "qwen" in archs:
        out["tool_call_parser"] = "hermes"
    elif model_type == "llama" or "llama" in archs:
        out["tool_call_parser"] = "llama3_json"
    elif model_type.startswith("mistral") or "mistral" in archs:
        out["tool_call_parser"] = "mistral"
    if model_type.startswith("qwen3") or "qwen3" in archs:
        out["chat_template_kwargs"] = {"enable_thinking": False}
    if "deepseek-r1" in lowered or "deepseek_r1" in lowered:
        out["reasoning_parser"] = "deepseek_r1"
    return out


# --- scanning (blocking I/O; run in a thread) -----------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


MAX_TEMPLATE_CHARS = 64 * 1024  # it travels in every snapshot: a bigger one is left out


def _chat_template(model_dir: Path) -> str | None:
    path = model_dir / "tokenizer_config.json"
    try:
        if path.stat().st_size > 16 * MAX_TEMPLATE_CHARS:
            return None
        template = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and len(template) <= MAX_TEMPLATE_CHARS else None


def read_facts(model_dir: Path) -> ModelFacts:
    cfg = json.loads((model_dir / "config.json").read_text())
    if not isinstance(cfg, dict):
        raise ValueError("config.json is not an object")
    # Multimodal configs keep the language model's shape under text_config.
    nested = cfg.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else cfg
    heads = _int(text.get("num_attention_heads"))
    hidden = _int(text.get("hidden_size"))
    head_dim = _int(text.get("head_dim"))
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    quant = cfg.get("quantization_config")
    archs = cfg.get("architectures") or []
    labels = cfg.get("id2label")
    num_labels = _int(cfg.get("num_labels")) or (len(labels) if isinstance(labels, dict) and labels else None)
    return ModelFacts(
        architectures=tuple(a for a in archs if isinstance(a, str)),
        model_type=cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
        quantization=quant.get("quant_method") if isinstance(quant, dict) else None,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or "") or None,
        num_layers=_int(text.get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=_int(text.get("num_key_value_heads")) or heads,
        head_dim=head_dim,
        max_position_embeddings=_int(text.get("max_position_embeddings")),
        weight_bytes=weight_bytes(model_dir),
        num_labels=num_labels,
        sentence_transformers=(model_dir / "modules.json").is_file(),
        modified_at=(model_dir / "config.json").stat().st_mtime,
        vision=isinstance(cfg.get("vision_config"), dict),
        chat_template=_chat_template(model_dir),
    )


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the weight files vLLM would load (safetensors preferred, as vLLM does)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text()).get("weight_map", {}).values())
            return sum((model_dir / n).stat().st_size for n in names if (model_dir / n).is_file())
        except (ValueError, OSError):
            pass
    for suffixes in ((".safetensors",), WEIGHT_SUFFIXES):
        files = [p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(suffixes)]
        if files:
            return sum(p.stat().st_size for p in files)
    return 0


def _has_weights(model_dir: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in model_dir.iterdir())


def is_adapter_dir(path: Path) -> bool:
    """A LoRA adapter as peft saves one: adapter_config.json and its weights."""
    return (path / ADAPTER_CONFIG).is_file() and any(
        (path / f"adapter_model{suffix}").is_file() for suffix in (".safetensors", ".bin")
    )


def read_adapter(path: Path) -> tuple[str | None, int | None]:
    """(base_model_name_or_path, rank) from adapter_config.json."""
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{ADAPTER_CONFIG} is not an object")
    base = cfg.get("base_model_name_or_path")
    return (base if isinstance(base, str) and base else None), _int(cfg.get("r"))


def lora_rank_for(ranks: list[int]) -> int:
    """vLLM's --max-lora-rank takes one of a few values: the smallest that holds every adapter."""
    need = max(ranks, default=8)
    return next((r for r in LORA_RANKS if r >= need), LORA_RANKS[-1])


def discover(models_dir: Path) -> dict[str, Path]:
    """Model directories under models_dir (config.json plus weights, or a LoRA adapter),
    keyed by relative path."""
    found: dict[str, Path] = {}
    if not models_dir.is_dir():
        return found

    def walk(directory: Path, depth: int) -> None:
        try:
            children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            try:
                if ((child / "config.json").is_file() and _has_weights(child)) or is_adapter_dir(child):
                    found[child.relative_to(models_dir).as_posix()] = child
                elif depth < MAX_SCAN_DEPTH:
                    walk(child, depth + 1)
            except OSError as exc:
                log.warning("skipping %s: %s", child, exc)

    walk(models_dir, 1)
    return found


def load_models_file(path: Path) -> ModelsFile:
    if not path.exists():
        return ModelsFile()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ModelsFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from exc


def _spec(name: str, path: Path, facts: ModelFacts, ov: ModelOverride, base: Path) -> ModelSpec:
    defaults = family_defaults(name, facts)

    def parser(value: str | None, key: str) -> str | None:
        chosen = value if value is not None else defaults.get(key)
        return None if chosen in (None, "none") else chosen

    return ModelSpec(
        name=name,
        path=path,
        facts=facts,
        aliases=tuple(ov.aliases),
        pinned=ov.pinned,
        vram_gb=ov.vram_gb,
        max_model_len=ov.max_model_len,
        max_num_seqs=ov.max_num_seqs,
        tool_call_parser=parser(ov.tool_call_parser, "tool_call_parser"),
        reasoning_parser=parser(ov.reasoning_parser, "reasoning_parser"),
        chat_template_kwargs=dict(
            ov.chat_template_kwargs if ov.chat_template_kwargs is not None else defaults.get("chat_template_kwargs", {})
        ),
        extra_args=tuple(ov.extra_args),
        replicas=ov.replicas,
        env=dict(ov.env),
        gpus=tuple(ov.gpus) if ov.gpus is not None else None,
        max_tokens=ov.max_tokens,
        fallbacks=tuple(ov.fallbacks),
        fallback_default=ov.fallback_default,
        scheduling_policy=ov.scheduling_policy,
        python=(base / ov.python) if ov.python else None,
        runner=ov.runner,
        convert=ov.convert,
        sleep=ov.sleep,
        idle_ttl_s=ov.idle_ttl_s,
        preload=ov.preload,
        enforce_eager=ov.enforce_eager,
        load_format=ov.load_format,
        compilation_config=ov.compilation_config,
        span=ov.span,
    )


def find_base(ref: str, models: dict[str, ModelSpec], models_dir: Path) -> str | None:
    """The model an adapter's base_model_name_or_path means on this host: a model of that
    name, or whose directory is that path (relative, absolute, or the hub id's last part)."""
    if ref in models and not models[ref].is_adapter:
        return ref
    bases = {n: s for n, s in models.items() if not s.is_adapter}
    for test in (
        lambda s: s.path == Path(ref),
        lambda s: s.path == models_dir / ref,
        lambda s: s.path.name == ref.rstrip("/").rsplit("/", 1)[-1],
    ):
        found = sorted(n for n, spec in bases.items() if test(spec))
        if len(found) == 1:
            return found[0]
    return None


def _add_adapters(
    models: dict[str, ModelSpec],
    missing: dict[str, Path],
    adapters: list[tuple[str, Path, ModelOverride]],
    overrides: dict[str, ModelOverride],
    models_dir: Path,
    models_file: Path,
) -> None:
    """Adapters become models served by their base's workers; bases with adapters (or
    max_loras in models.yaml) get LoRA turned on, sized for the adapters present."""
    ranks: dict[str, list[int]] = {}
    for name, path, ov in adapters:
        try:
            ref, rank = read_adapter(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping adapter %s: %s", path, exc)
            missing[name] = path
            continue
        base = ov.base or (find_base(ref, models, models_dir) if ref else None)
        if base is None or base not in models or models[base].is_adapter:
            log.warning(
                "adapter %s (%s): no base model for %r on this host; name one with models.yaml's base",
                name,
                path,
                ov.base or ref,
            )
            missing[name] = path
            continue
        spec = _spec(name, path, models[base].facts, ov, models_file.parent)
        models[name] = dataclasses.replace(spec, base=base, lora_rank=rank)
        ranks.setdefault(base, []).append(rank or 8)
    for name, spec in list(models.items()):
        ov = overrides.get(name, ModelOverride())
        if spec.is_adapter or (name not in ranks and ov.max_loras is None):
            continue
        present = ranks.get(name, [])
        rank = lora_rank_for([*present, *([ov.max_lora_rank] if ov.max_lora_rank else [])])
        models[name] = dataclasses.replace(
            spec, lora=(ov.max_loras or min(max(len(present), 1), DEFAULT_MAX_LORAS), rank)
        )


def check_span(spec: ModelSpec, models_file: Path) -> None:
    """A model across hosts whose cut vLLM would refuse for its shape: ConfigError naming the numbers."""
    if spec.span is None:
        return
    f = spec.facts
    problem = shape_problem(spec.span, f.num_heads, f.num_kv_heads, f.num_layers)
    if problem is not None:
        key, why = problem
        raise ConfigError(f"{models_file}: models.{spec.name}.{key}: {why} ({spec.span.describe()})")


def scan(models_dir: Path, models_file: Path) -> Registry:
    """Build the registry from disk. Configuration errors raise ConfigError naming the key."""
    models_yaml = load_models_file(models_file)
    overrides = models_yaml.models
    for name in overrides:
        if not valid_name(name):
            raise ConfigError(f"{models_file}: models.{name}: not a valid model name ({NAME_RE.pattern})")
    configured_aliases = frozenset(a for ov in overrides.values() for a in ov.aliases)
    dirs = discover(models_dir)
    models: dict[str, ModelSpec] = {}
    missing: dict[str, Path] = {}
    claimed: set[str] = set()
    adapters: list[tuple[str, Path, ModelOverride]] = []  # resolved once every base is known
    for name, ov in overrides.items():
        rel = ov.path or name
        claimed.add(rel)
        path = dirs.get(rel)
        if path is None:
            missing[name] = models_dir / rel
            continue
        if is_adapter_dir(path):
            adapters.append((name, path, ov))
            continue
        try:
            models[name] = _spec(name, path, read_facts(path), ov, models_file.parent)
        except (OSError, ValueError) as exc:
            log.warning("model %s: cannot read %s: %s", name, path / "config.json", exc)
            missing[name] = path
            continue
        check_span(models[name], models_file)
    for rel, path in dirs.items():
        if rel in claimed:
            continue
        name = rel.replace("/", "--")
        if not valid_name(name) or name in models or name in overrides:
            log.warning("skipping model directory %s: %r is not usable as a model name", path, name)
            continue
        if name in configured_aliases:
            # One stray directory must not fail every scan: the alias keeps its meaning.
            log.warning("skipping model directory %s: %r is an alias in %s", path, name, models_file)
            continue
        if is_adapter_dir(path):
            adapters.append((name, path, ModelOverride()))
            continue
        try:
            models[name] = _spec(name, path, read_facts(path), ModelOverride(), models_file.parent)
        except (OSError, ValueError) as exc:
            log.warning("skipping model directory %s: %s", path, exc)

    _add_adapters(models, missing, adapters, overrides, models_dir, models_file)

    aliases: dict[str, str] = {}
    for name, ov in overrides.items():
        for alias in ov.aliases:
            if alias in overrides or alias in models:
                raise ConfigError(f"{models_file}: models.{name}.aliases: {alias!r} is already a model name")
            if alias in aliases:
                raise ConfigError(
                    f"{models_file}: models.{name}.aliases: {alias!r} is already an alias of {aliases[alias]!r}"
                )
            aliases[alias] = name
    # An alias of a model whose files are absent stays out: it must never route elsewhere.
    aliases = {a: m for a, m in aliases.items() if m in models}
    splits = check_splits(models_yaml.splits, models, aliases, overrides, models_file)
    return Registry(
        models=models,
        aliases=aliases,
        missing=missing,
        configured_aliases=configured_aliases | frozenset(splits),
        splits=splits,
    )
