"""What a model can serve, before it ever loaded (pure).

The prediction follows vLLM 0.32's own choice of runner and conversion
(vllm/config/model.py: the architecture-suffix table, Sentence Transformers
directories, ``--runner``/``--convert``) and the routes it then mounts. Once a
worker of the model has run, the loader records the inference routes its
API server really mounted (its OpenAPI document), and that measurement wins
(:mod:`ssw.loader.store`): a prediction only has to be right about models that never
loaded here, where being wrong costs a load, not a wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssw.common.routes import Family

Runner = Literal["generate", "pooling"]
Convert = Literal["none", "embed", "classify"]

# Suffix -> (runner, convert), first match wins; as vLLM's _SUFFIX_TO_DEFAULTS.
SUFFIX_DEFAULTS: tuple[tuple[str, Runner, Convert], ...] = (
    ("ForCausalLM", "generate", "none"),
    ("ForConditionalGeneration", "generate", "none"),
    ("ChatModel", "generate", "none"),
    ("LMHeadModel", "generate", "none"),
    ("ForTextEncoding", "pooling", "embed"),
    ("EmbeddingModel", "pooling", "embed"),
    ("ForSequenceClassification", "pooling", "classify"),
    ("ForTokenClassification", "pooling", "classify"),
    ("ForAudioClassification", "pooling", "classify"),
    ("ForImageClassification", "pooling", "classify"),
    ("ForVideoClassification", "pooling", "classify"),
    ("ClassificationModel", "pooling", "classify"),
    ("ForRewardModeling", "pooling", "embed"),
    ("RewardModel", "pooling", "embed"),
    ("Model", "pooling", "embed"),
)

# Speech models vLLM 0.32 transcribes with (SupportsTranscription); the first set
# does nothing else (supports_transcription_only), so it mounts no chat routes.
TRANSCRIPTION_ONLY = frozenset(
    {
        "WhisperForConditionalGeneration",
        "CohereAsrForConditionalGeneration",
        "FireRedAsr2ForConditionalGeneration",
        "FunASRForConditionalGeneration",
        "MossTranscribeDiarizeForConditionalGeneration",
    }
)
TRANSCRIPTION_TOO = frozenset(
    {
        "VoxtralForConditionalGeneration",
        "Gemma3nForConditionalGeneration",
        "GlmAsrForConditionalGeneration",
        "GraniteSpeechForConditionalGeneration",
        "MoonshotKimiaForCausalLM",
        "Qwen3ASRForConditionalGeneration",
        "Qwen3OmniMoeForConditionalGeneration",
    }
)

GENERATE = frozenset({Family.CHAT, Family.COMPLETIONS, Family.RESPONSES, Family.MESSAGES, Family.TOKENIZE})
SPEECH = frozenset({Family.TRANSCRIPTION, Family.TRANSLATION, Family.TOKENIZE})
EMBED = frozenset({Family.EMBEDDINGS, Family.POOLING, Family.SCORE, Family.RERANK, Family.TOKENIZE})
CLASSIFY = frozenset({Family.CLASSIFY, Family.POOLING, Family.TOKENIZE})


@dataclass(frozen=True)
class Shape:
    """The facts the prediction reads (from the registry's ModelFacts and models.yaml)."""

    architectures: tuple[str, ...]
    sentence_transformers: bool = False  # modules.json: vLLM pools such a directory
    num_labels: int | None = None
    runner: str = "auto"
    convert: str = "auto"


def _default(archs: tuple[str, ...], runner: Runner | None = None) -> tuple[Runner, Convert] | None:
    for arch in archs:
        for suffix, r, c in SUFFIX_DEFAULTS:
            if (runner is None or runner == r) and arch.endswith(suffix):
                return r, c
    return None


def runner_and_convert(shape: Shape) -> tuple[Runner, Convert]:
    if shape.runner in ("generate", "pooling"):
        runner: Runner = shape.runner  # type: ignore[assignment]
    elif shape.sentence_transformers:
        runner = "pooling"
    else:
        found = _default(shape.architectures)
        runner = found[0] if found else "generate"
    if shape.convert in ("none", "embed", "classify"):
        return runner, shape.convert  # type: ignore[return-value]
    found = _default(shape.architectures, runner)
    if found is not None:
        return runner, found[1]
    return runner, "embed" if runner == "pooling" else "none"


def predict(shape: Shape) -> frozenset[Family]:
    runner, convert = runner_and_convert(shape)
    archs = set(shape.architectures)
    if runner == "generate":
        if archs & TRANSCRIPTION_ONLY:
            return SPEECH
        return GENERATE | SPEECH if archs & TRANSCRIPTION_TOO else GENERATE
    if convert == "classify":
        # A classifier with one label is a cross-encoder: vLLM scores and reranks with it.
        return CLASSIFY | {Family.SCORE, Family.RERANK} if shape.num_labels == 1 else CLASSIFY
    return EMBED
