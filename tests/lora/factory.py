"""Real PEFT adapters for tests, made with peft from the embedded base (random non-zero weights).

The base model is loaded once per test process; each adapter kind is saved once per factory and copied
into a test's adapters root as needed.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

BASE_DIR = Path.home() / ".cache" / "governor" / "models" / "SmolLM2-135M-Instruct"
BASE_NAME = "SmolLM2-135M-Instruct"


def require_base() -> None:
    if not (BASE_DIR / "config.json").is_file():
        pytest.skip(f"embedded base model not prepared at {BASE_DIR} (run `governor model prepare`)")


@functools.cache
def base_model() -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)


def save_adapter(model: Any, dest: Path, r: int, targets: list[str], seed: int) -> Any:
    """Save a LoRA adapter of `model` to dest; returns the model with the LoRA layers removed again."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(dest))
    return peft_model.unload()


class AdapterFactory:
    """Golden adapter folders under `workdir`, copied into tests' roots."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._golden: dict[str, Path] = {}

    def golden(self, kind: str = "good") -> Path:
        if kind not in self._golden:
            dest = self.workdir / kind
            if kind == "good":
                save_adapter(base_model(), dest, 8, ["q_proj", "v_proj"], seed=1)
            elif kind == "good2":  # same shape, other weights: a changed push of "good"
                save_adapter(base_model(), dest, 8, ["q_proj", "v_proj"], seed=2)
            elif kind == "rank32":
                save_adapter(base_model(), dest, 32, ["q_proj", "v_proj"], seed=3)
            elif kind == "tiny":
                self._tiny(dest)
            else:
                raise ValueError(kind)
            self._golden[kind] = dest
        return self._golden[kind]

    def copy(self, kind: str, dest: Path) -> Path:
        shutil.copytree(self.golden(kind), dest)
        return dest

    def _tiny(self, dest: Path) -> None:
        """An adapter trained on another (tiny) Llama, claiming the embedded base's name: only shapes differ."""
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )  # fmt: skip
        save_adapter(AutoModelForCausalLM.from_config(config), dest, 8, ["q_proj", "v_proj"], seed=4)
        edit_config(dest, base_model_name_or_path="HuggingFaceTB/" + BASE_NAME)


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
