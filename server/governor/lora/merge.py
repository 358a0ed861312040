"""`governor adapters merge`: bake one LoRA adapter into its base model (W' = W + B·A·alpha/r).

A deployment that serves one fine-tuned adapter pays LoRA's per-token cost on every request; the
merged model is served with LoRA off instead. The adapter goes through the same validation (and
staging) as a load, the merge runs in float32 (the embedded base is stored in bf16: a bf16 merge
rounds the low-rank update away), and the folder is written under a temporary name in the same
directory and renamed at the end, so a merge killed at any point leaves no output folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from governor.errors import InvalidRequest
from governor.lora.base_model import BaseModelInfo
from governor.lora.staging import AdapterStager
from governor.lora.validate import NAME_RE, PROFILE, AdapterValidator, ValidatedAdapter

PROVENANCE = "governor-merge.json"
# Files of a model folder that are not weights and that the merged model needs as they are.
BASE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
FLOAT32_BYTES = 4
# Loading in float32 and merging in place needs the model once plus transient copies per layer.
MEMORY_FACTOR = 1.5
DISK_FACTOR = 1.1


class MergeError(InvalidRequest):
    """A merge that cannot run as asked (output exists, quantized base, not enough memory or disk)."""

    code = "merge_refused"


@dataclass(frozen=True)
class MergePlan:
    """What a merge reads and writes, checked before any weight is loaded."""

    base_dir: Path
    base_name: str
    adapter: ValidatedAdapter
    out: Path
    params: int


def _folder_and_root(name_or_path: str, adapters_dir: Path) -> tuple[Path, str, str]:
    """(root, path under it, adapter name): a folder given by path is validated under its parent."""
    given = Path(name_or_path).expanduser()
    if given.is_dir():
        folder = given.resolve()
        return folder.parent, folder.name, folder.name
    return adapters_dir.expanduser().resolve(), name_or_path, Path(name_or_path).name


def _param_count(base_dir: Path) -> int:
    """Parameters of the base, from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for weights in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                total += count
    return total


def plan_merge(
    base_dir: Path,
    base_name: str,
    name_or_path: str,
    out: Path,
    *,
    adapters_dir: Path,
    staging_dir: Path,
    max_rank: int,
    max_bytes: int,
    force: bool,
) -> MergePlan:
    """Every check that needs no weights: the base, the adapter (as a load validates it), output, memory, disk."""
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise MergeError(f"No model folder at {base_dir}: config.json is missing.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise MergeError(
            f"The base model is quantized ({method}): a LoRA update merged into quantized weights is rounded away "
            "or cannot be stored. Merge into the unquantized base, then quantize the merged model."
        )
    out = out.expanduser().resolve()
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force to replace it.", param="out")
    base = BaseModelInfo.from_dir(base_dir, base_name)
    root, path, name = _folder_and_root(name_or_path, adapters_dir)
    validator = AdapterValidator(root, base, max_rank, max_bytes, AdapterStager(staging_dir))
    adapter = validator.validate(name if _valid_name(name) else "merge", path)
    params = _param_count(base_dir)
    need_memory = int(params * FLOAT32_BYTES * MEMORY_FACTOR)
    available = psutil.virtual_memory().available
    if need_memory > available:
        raise MergeError(
            f"Not enough memory: merging {params / 1e9:.2f} B parameters in float32 needs about "
            f"{need_memory / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is available."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    need_disk = int(params * FLOAT32_BYTES * DISK_FACTOR)
    free = shutil.disk_usage(out.parent).free
    if need_disk > free:
        raise MergeError(
            f"Not enough disk under {out.parent}: the merged model takes about {need_disk / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free.",
            param="out",
        )
    return MergePlan(base_dir, base_name, adapter, out, params)


def _valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name)) and ".." not in name


def run_merge(plan: MergePlan, progress: Callable[[str], None], *, force: bool = False) -> Path:
    """Load, merge, write into a temporary folder beside the output, then rename it into place."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = plan.out
    _remove_stale_work(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        progress(f"loading base {plan.base_dir} in float32 ({plan.params / 1e6:.0f} M parameters)")
        model = AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)
        progress(
            f"applying adapter {plan.adapter.name} (rank {plan.adapter.rank}, sha256 {plan.adapter.fingerprint[:12]})"
        )
        peft_model = PeftModel.from_pretrained(model, str(plan.adapter.staged), torch_dtype=torch.float32)
        progress("merging the low-rank update into the base weights")
        merged = peft_model.merge_and_unload()
        progress(f"writing the merged model (float32 safetensors) to {out}")
        # transformers refuses to save some models' own generation config (sampling fields without
        # do_sample); the base's file is copied as it is below, so a default one is written first.
        merged.generation_config = GenerationConfig()
        merged.save_pretrained(str(work), safe_serialization=True)
        for name in BASE_FILES:
            if (plan.base_dir / name).is_file():
                shutil.copy2(plan.base_dir / name, work / name)
        if plan.adapter.profile is not None:
            (work / PROFILE).write_text(json.dumps(plan.adapter.profile, indent=2), encoding="utf-8")
        (work / PROVENANCE).write_text(json.dumps(provenance(plan), indent=2), encoding="utf-8")
        # mkdtemp made the folder private; the merged model is as readable as any model folder.
        os.chmod(work, 0o755)
        for path in work.iterdir():
            os.chmod(path, 0o644)
        if out.exists() and force:
            shutil.rmtree(out)
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"done: serve it with `governor serve --model {out}` and GOVERNOR_LORA=false")
    return out


# What a user key sees of a merge on /v1/models: names and hashes, never where the files were (admin only).
PUBLIC_PROVENANCE = ("base_model", "adapter", "adapter_sha256", "adapter_rank", "dtype", "merged_at")


def provenance(plan: MergePlan) -> dict[str, Any]:
    """What the merged folder was made from: shown on /v1/models for the served model (paths to the admin key)."""
    return {
        "base_model": plan.base_name,
        "base_path": str(plan.base_dir),
        "adapter": plan.adapter.name,
        "adapter_path": str(plan.adapter.folder),
        "adapter_sha256": plan.adapter.fingerprint,
        "adapter_rank": plan.adapter.rank,
        "dtype": "float32",
        "merged_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def read_provenance(model_dir: Path | None) -> dict[str, Any] | None:
    """The provenance of a merged model folder, or None for any other model."""
    if model_dir is None:
        return None
    try:
        data = json.loads((model_dir / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_stale_work(out: Path) -> None:
    """Temporary folders of earlier merges to the same output that were killed before their rename."""
    for stale in out.parent.glob(f".{out.name}.merging-*"):
        with contextlib.suppress(OSError):
            shutil.rmtree(stale)
