"""adapter_config.json fields: configs the installed peft writes pass; fields Governor does not know, values vLLM
cannot serve and every pattern-bearing field that fails the regex rules (RE2, bounded, no backtracking on
Python's re) are refused with the field named."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from governor.errors import GovernorError, InvalidRequest
from governor.lora import peft_config
from governor.lora.base_model import BaseModelInfo
from governor.lora.staging import AdapterStager
from governor.lora.validate import CONFIG, AdapterValidator
from tests.lora.factory import BASE_NAME, AdapterFactory, edit_config


def validator(root: Path, base: BaseModelInfo) -> AdapterValidator:
    return AdapterValidator(root, base, 16, 64 * 1024 * 1024, AdapterStager(root.parent / "staged"))


def refused(root: Path, base: BaseModelInfo) -> GovernorError:
    with pytest.raises(GovernorError) as info:
        validator(root, base).validate("a", "a")
    return info.value


def peft_written(dest: Path, **options: Any) -> dict[str, Any]:
    """The adapter_config.json the installed peft writes for a LoraConfig (every field it knows, with values)."""
    from peft import LoraConfig

    LoraConfig(**options).save_pretrained(str(dest))
    return dict(json.loads((dest / CONFIG).read_text()))


def test_every_field_the_installed_peft_writes_is_decided(tmp_path: Path) -> None:
    """A peft upgrade that writes a new field fails here, so someone decides what Governor does with it."""
    written = peft_written(tmp_path, r=8, target_modules=["q_proj"])
    assert set(written) - set(peft_config.FIELDS) == set()


def test_configs_the_installed_peft_writes_pass(
    root: Path, tmp_path: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    folder = factory.copy("good", root / "a")  # saved by get_peft_model(...).save_pretrained: auto_mapping and all
    validator(root, base_info).validate("a", "a")
    written = peft_written(
        tmp_path / "cfg", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        base_model_name_or_path="HuggingFaceTB/" + BASE_NAME, use_rslora=True, lora_dropout=0.05,
        init_lora_weights="gaussian", rank_pattern={r"model\.layers\.\d+\.self_attn\.q_proj": 8, "k_proj": 4},
        alpha_pattern={"v_proj": 32}, exclude_modules=r".*\.layers\.29\..*", layers_to_transform=list(range(29)),
        layers_pattern="layers", inference_mode=True, revision="main",
    )  # fmt: skip
    (folder / CONFIG).write_text(json.dumps(written))
    assert validator(root, base_info).validate("a", "a").rank == 8


REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"surprise": 1}, "'surprise'"),
    ({"vllm_lora_scaling_factor": 100.0}, "'vllm_lora_scaling_factor'"),
    ({"rank_pattern": {r"(q)_proj\1": 8}}, "RE2"),
    ({"alpha_pattern": {r"(?=q)q_proj": 16}}, "RE2"),
    ({"exclude_modules": r"(q)\1"}, "RE2"),
    ({"layers_pattern": [r"lay(?!x)ers"]}, "RE2"),
    ({"rank_pattern": {"q_proj)|(k": 8}}, "RE2"),  # valid only inside PEFT's wrapper, which it would escape
    ({"rank_pattern": {"x" * 300: 8}}, "limit is 256"),
    ({"rank_pattern": {"(.|.)*Z": 8}}, "backtrack"),
    ({"alpha_pattern": {"(a+)+q_proj": 16}}, "backtrack"),
    ({"alpha_pattern": {".*.*.*.*q_proj": 16}}, "backtrack"),
    ({"rank_pattern": {f".*.*.*q_proj{i}": 8 for i in range(11)}}, "32"),
    ({"rank_pattern": {f"q_proj{i}": 8 for i in range(2000)}}, "1024"),
    ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"megatron_core": "os"}, "megatron_core"),
    ({"auto_mapping": {"base_model_class": "X", "parent_library": "os"}}, "auto_mapping"),
    ({"layer_replication": [[0, 4], [2, 6]]}, "layer_replication"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"alora_invocation_tokens": [1]}, "alora_invocation_tokens"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"astra_config": {"cache_file": None, "verbose": False}}, "Astra"),
    ({"init_lora_weights": "astra"}, "Astra"),
    ({"init_lora_weights": "nora"}, "gaussian"),  # weight-only, but vLLM 0.32 refuses it at load
    ({"use_qalora": True}, "use_qalora"),
    ({"peft_version": ["0.1"]}, "peft_version"),
    ({"layers_to_transform": ["0"]}, "layers_to_transform"),
]


@pytest.mark.parametrize(("changes", "reason"), REFUSALS, ids=[next(iter(c)) for c, _ in REFUSALS])
def test_refused_fields_and_values(
    changes: dict[str, Any], reason: str, root: Path, factory: AdapterFactory, base_info: BaseModelInfo
) -> None:
    edit_config(factory.copy("good", root / "a"), **changes)
    started = time.perf_counter()
    err = refused(root, base_info)
    assert time.perf_counter() - started < 10  # decided without running a pattern on a backtracking engine (minutes)
    assert isinstance(err, InvalidRequest) and err.status == 400
    assert reason in err.message and next(iter(changes)) in err.message, err.message
    # Refused without a known base too: these checks need no module list.
    assert reason in refused(root, BaseModelInfo.unknown(BASE_NAME)).message


def test_target_modules_follow_the_same_rules(root: Path, factory: AdapterFactory, base_info: BaseModelInfo) -> None:
    """target_modules matches every module PEFT's merge runs it on, so it must not backtrack there either."""
    folder = factory.copy("good", root / "a")
    edit_config(folder, target_modules=r"(.|.)*(q|v)_proj")  # RE2 matches q/v; Python's re: 2^n per module
    err = refused(root, base_info)
    assert err.param == "target_modules" and "backtrack" in err.message
    # PEFT's documented example passes the shape rules (three unbounded repeats, an alternation outside them).
    peft_config.compile_pattern(r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$")
