"""What a model can serve before it ever loaded, as vLLM 0.32 decides it."""

from __future__ import annotations

import pytest

from ssw.common.routes import Family
from ssw.loader.models.capabilities import CLASSIFY, EMBED, GENERATE, SPEECH, Shape, predict, runner_and_convert


@pytest.mark.parametrize(
    ("shape", "runner", "convert", "families"),
    [
        (Shape(("Qwen2ForCausalLM",)), "generate", "none", GENERATE),
        (Shape(("LlavaForConditionalGeneration",)), "generate", "none", GENERATE),
        (Shape(("Qwen2ForCausalLM",), runner="pooling", convert="embed"), "pooling", "embed", EMBED),
        (Shape(("Qwen2ForCausalLM",), runner="pooling"), "pooling", "embed", EMBED),  # vLLM's default conversion
        (Shape(("Qwen2ForCausalLM",), sentence_transformers=True), "pooling", "embed", EMBED),
        (Shape(("BertModel",)), "pooling", "embed", EMBED),
        (
            Shape(("XLMRobertaForSequenceClassification",), num_labels=1),
            "pooling",
            "classify",
            CLASSIFY | {Family.SCORE, Family.RERANK},
        ),
        (Shape(("BertForSequenceClassification",), num_labels=3), "pooling", "classify", CLASSIFY),
        (Shape(("Qwen2ForRewardModel",)), "pooling", "embed", EMBED),
        (Shape(("WhisperForConditionalGeneration",)), "generate", "none", SPEECH),
        (Shape(("VoxtralForConditionalGeneration",)), "generate", "none", GENERATE | SPEECH),
        (Shape(()), "generate", "none", GENERATE),  # no architecture: vLLM's fallback
    ],
)
def test_prediction(shape: Shape, runner: str, convert: str, families: frozenset[Family]) -> None:
    assert runner_and_convert(shape) == (runner, convert)
    assert predict(shape) == families
