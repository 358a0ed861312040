"""BaseModelInfo: what an adapter must agree with — the served name, sizes and linear modules of the base."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

log = logging.getLogger("governor.lora")

_LAYER = re.compile(r"\.layers\.(\d+)\.")
# Modules that hold no LoRA-able linear weight even though their tensor is 2-D.
_NOT_LINEAR = ("embed_tokens", "wte", "wpe", "embeddings", "norm", "ln_")


def last_component(name: str) -> str:
    """'org/Model' or '/path/to/Model/' → 'model' (for case-insensitive comparison)."""
    return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].casefold()


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model as far as adapter validation needs it; `unknown()` when only a name is known."""

    served_name: str
    model_dir: Path | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    modules: frozenset[str] = frozenset()  # leaf names of linear modules: q_proj, down_proj, …
    # Full module path ('model.layers.0.self_attn.q_proj') → weight shape (out_features, in_features).
    shapes: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        """True when sizes and modules were read from a local model directory."""
        return self.model_dir is not None and bool(self.shapes)

    def names(self) -> set[str]:
        """Names an adapter's `base_model_name_or_path` may end with."""
        out = {last_component(self.served_name)} if self.served_name else set()
        if self.model_dir is not None:
            out.add(last_component(str(self.model_dir)))
        return out

    @classmethod
    def unknown(cls, served_name: str = "") -> BaseModelInfo:
        """A remote engine's model: only name-based checks apply."""
        return cls(served_name=served_name)

    @classmethod
    def from_dir(cls, model_dir: Path, served_name: str = "") -> BaseModelInfo:
        """Read config.json and the safetensors headers (no weights are loaded)."""
        model_dir = Path(model_dir).expanduser().resolve()
        config = _text_config(json.loads((model_dir / "config.json").read_text()))
        shapes = _weight_shapes(model_dir)
        modules = frozenset(path.rsplit(".", 1)[-1] for path in shapes)
        return cls(
            served_name=served_name or model_dir.name,
            model_dir=model_dir,
            hidden_size=_int(config.get("hidden_size")),
            intermediate_size=_int(config.get("intermediate_size")),
            num_hidden_layers=_int(config.get("num_hidden_layers")),
            vocab_size=_int(config.get("vocab_size")),
            modules=modules,
            shapes=shapes,
        )

    @classmethod
    def detect(cls, model_dir: Path | None, served_name: str) -> BaseModelInfo:
        """from_dir when a local directory is readable, else unknown (never fails the server start)."""
        if model_dir is None:
            return cls.unknown(served_name)
        try:
            return cls.from_dir(model_dir, served_name)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("base model info unavailable (%s); only name checks apply to adapters", exc)
            return cls.unknown(served_name)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal configs nest the language model's sizes.
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({model_dir / name for name in weight_map.values()})
    return sorted(model_dir.glob("*.safetensors"))


def _weight_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if not key.endswith(".weight"):
                    continue
                module = key[: -len(".weight")]
                leaf = module.rsplit(".", 1)[-1]
                if any(part in leaf for part in _NOT_LINEAR):
                    continue
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    shapes[module] = (int(shape[0]), int(shape[1]))
    return shapes


def layer_index(module: str) -> int | None:
    match = _LAYER.search("." + module + ".")
    return int(match.group(1)) if match else None
