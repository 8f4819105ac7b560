"""Generate a tiny LoRA adapter (peft) for the tiny model, locally (no hub).
Run with the Python of vLLM's venv:  python make_tiny_adapter.py BASE_DIR OUT_DIR [RANK]
Its weights are random, so the adapter visibly changes the base's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def make(base: Path, out: Path, rank: int = 8) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(out)
    # Where vLLM and ssw look for the base: the model's directory name.
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base.name
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for path in out.iterdir():
        path.chmod(0o644)  # peft writes the weights 0600: the workers' account reads them


if __name__ == "__main__":
    make(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 8)
