"""A minimal PEFT LoRA folder for runs against the fake engine (no torch, no real base model)."""

from __future__ import annotations

import json
from pathlib import Path


def write_adapter(root: Path, name: str, rank: int = 4) -> Path:
    """Enough for validation against a remote engine's (unknown) base: config + safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = root / name
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.full((rank, 8), 0.01, dtype=np.float32),
        f"{prefix}.lora_B.weight": np.full((8, rank), 0.01, dtype=np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder
