"""adapter_config.json, field by field: every field vLLM or PEFT reads is decided here, and the rest refused.

Nothing Governor did not look at reaches the engine: vLLM reads part of the config (its PEFTHelper), PEFT reads all
of it when `governor adapters merge` loads the adapter, and some fields choose code paths (`megatron_core` and
`auto_mapping` name modules PEFT imports). Each field has a rule accepting the values that mean a plain LoRA,
which is what Governor serves; a feature vLLM refuses at load (DoRA, LoRA bias, aLoRA, inits that change the base
weights...) is refused here first, with the same reason. Every field the installed peft writes has a rule
(tests/lora/test_peft_config.py fails when a peft upgrade adds one); unknown fields are refused, not passed on.

Pattern-bearing fields (`target_modules` and `exclude_modules` given as a string, `rank_pattern` and
`alpha_pattern` keys, `layers_pattern`) are regexes that PEFT runs on Python's `re` and vLLM (rank/alpha keys) on
the `regex` module, against every module name; both backtrack. Governor matches them only on RE2, and admits a
pattern only if it is ≤ 256 characters, compiles on RE2 (no backreferences, lookaround) within a memory bound,
parses on Python's `re` as the engine will run it (inside PEFT's wrapper, which a key may not escape), and has a
shape that cannot backtrack badly there: no repeat or alternation inside a repeat (`(a+)+`, `(.|.)*`) and at most
three unbounded repeats (`.*`, `\\d+`; PEFT's own example `.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$`
has three), so one module name costs at most ~n⁴ steps (n: its length, with the wrapper's `.*`), milliseconds;
and at most 32 such repeats in the whole config, so a load's matching stays within seconds on any model. The
shape check reads the pattern with Python's own parser, which matches nothing.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from typing import Any

import re2

from governor.errors import InvalidRequest

CONFIG = "adapter_config.json"
PEFT_KNOWN = "0.22"  # the newest peft whose LoraConfig fields all have a rule here
PATTERN_LIMIT = 256  # characters in one pattern; longer ones are refused before compiling
MAX_ENTRIES = 1024  # keys of rank_pattern/alpha_pattern, entries of a module list
MAX_WIDE_PER_PATTERN = 3
MAX_WIDE_TOTAL = 32
_RE2_MEMORY = 1 << 20  # bytes RE2 may use for one compiled pattern; bigger programs are refused
# How PEFT (and vLLM, for rank/alpha keys) embed each pattern before running it; "{}" is the pattern.
FULL = "{}"
KEY = r"(.*\.)?({})$"  # PEFT's get_pattern_key, vLLM's PEFTHelper._match_pattern
LAYERS = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # PEFT's check_target_module_exists
# Inits that only set the adapter's starting weights (vLLM's list); PiSSA, OLoRA, CorDA, LoftQ change the base.
WEIGHT_ONLY_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")

_parser: Any = importlib.import_module("re._parser")  # Python's regex parser: no matching, linear in the pattern
_sre: Any = importlib.import_module("re._constants")
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT}
_SINGLE_CHAR = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.CATEGORY, _sre.AT}

Rule = Callable[[str, Any, "_Budget"], None]


class _Budget:
    """Unbounded repeats counted over every pattern of one config."""

    def __init__(self) -> None:
        self.wide = 0


def refuse(field: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{CONFIG}: '{field}' {why}", param=field)


def check_fields(config: dict[str, Any]) -> None:
    """Refuse a config with a field Governor does not know, or a value it does not serve; the first reason wins."""
    unknown = sorted(k for k in config if k not in FIELDS)
    if unknown:
        names = ", ".join(repr(k[:64]) for k in unknown[:5])
        names += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidRequest(
            f"{CONFIG} has fields Governor does not know: {names}. Every field is checked before the engine reads "
            f"it, so unknown ones are refused: remove them (Governor knows the fields of PEFT {PEFT_KNOWN}'s "
            "LoraConfig).",
            param="adapter_config",
        )
    budget = _Budget()
    for field, value in config.items():
        FIELDS[field](field, value, budget)


# -- regexes -----------------------------------------------------------------------------------------------------


def compile_pattern(pattern: str, field: str = "target_modules", wrapper: str = FULL, budget: Any = None) -> Any:
    """`pattern` on RE2 (what Governor matches with), once it passed every rule in the module docstring."""
    where = f"{field} key" if wrapper == KEY else field
    if len(pattern) > PATTERN_LIMIT:
        raise InvalidRequest(
            f"{where} regex is {len(pattern)} characters; the limit is {PATTERN_LIMIT}. List the modules instead.",
            param=field,
        )
    options = re2.Options()
    options.max_mem = _RE2_MEMORY
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)  # alone: a key that only parses inside the wrapper escapes it
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidRequest(
            f"{where} regex {pattern!r} is refused: {reason}. Patterns run on RE2 (no backreferences or "
            "lookaround); list the modules instead.",
            param=field,
        ) from exc
    try:
        _parser.parse(wrapper.replace("{}", pattern))  # as PEFT and vLLM will run it
        parsed = _parser.parse(pattern)
    except (_sre.error, RecursionError, OverflowError) as exc:
        raise InvalidRequest(
            f"{where} regex {pattern!r} is refused: Python's re, which {_runners(field)} it on, cannot parse it "
            f"({exc}).",
            param=field,
        ) from exc
    wide = _wide_repeats(parsed, pattern, where, field, nested=False)  # refuses nesting as it finds it
    if wide > MAX_WIDE_PER_PATTERN:
        raise _backtracks(pattern, where, field, f"{wide} unbounded repeats")
    if budget is not None:
        budget.wide += wide
        if budget.wide > MAX_WIDE_TOTAL:
            raise _backtracks(pattern, where, field, f"over {MAX_WIDE_TOTAL} unbounded repeats in all its patterns")
    return compiled


def _wide_repeats(items: Any, pattern: str, where: str, field: str, nested: bool) -> int:
    """Unbounded (or wide) repeats in a parsed pattern; refuses a repeat or alternation inside a repeat."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if nested:
                raise _backtracks(pattern, where, field, "a repeat inside a repeat")
            if high > 1 and high != low:
                count += 1
            count += _wide_repeats(body, pattern, where, field, nested=high > 1)
        elif op is _sre.SUBPATTERN:
            count += _wide_repeats(av[-1], pattern, where, field, nested)
        elif op is _sre.BRANCH:
            if nested:
                raise _backtracks(pattern, where, field, "an alternation inside a repeat")
            count += sum(_wide_repeats(branch, pattern, where, field, nested) for branch in av[1])
        elif op not in _SINGLE_CHAR:  # lookaround, backreferences...: RE2 refused them already
            raise _backtracks(pattern, where, field, f"{str(op).lower()}")
    return count


def _runners(field: str) -> str:
    """Who runs the field's patterns on a backtracking engine (vLLM only reads rank/alpha keys)."""
    return "PEFT and vLLM run" if field in ("rank_pattern", "alpha_pattern") else "PEFT (adapters merge) runs"


def _backtracks(pattern: str, where: str, field: str, detail: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where} regex {pattern!r} could backtrack for minutes on Python's re, which {_runners(field)} it on for "
        f"every module name ({detail}). Use at most {MAX_WIDE_PER_PATTERN} unbounded repeats (.*, \\d+), none inside "
        "another repeat, and a character class ([qv]) instead of a repeated alternation; or list the modules.",
        param=field,
    )


# -- rules -------------------------------------------------------------------------------------------------------


def _same(value: Any, allowed: Any) -> bool:
    return type(value) is type(allowed) and value == allowed  # JSON types: true is not 1, [] is not {}


def only(*allowed: Any, why: str) -> Rule:
    """The field may hold only these values (its defaults): any other means a feature Governor does not serve."""

    def rule(field: str, value: Any, budget: _Budget) -> None:
        if not any(_same(value, a) for a in allowed):
            raise refuse(field, f"is {_short(value)}: {why}")

    return rule


def _short(value: Any) -> str:
    text = json.dumps(value)  # as the file spells it: true, null
    return text if len(text) <= 80 else text[:77] + "..."


def string(limit: int, *, nullable: bool = True) -> Rule:
    def rule(field: str, value: Any, budget: _Budget) -> None:
        if (value is None and nullable) or (isinstance(value, str) and len(value) <= limit):
            return
        raise refuse(field, f"must be a string of at most {limit} characters{' or null' if nullable else ''}.")

    return rule


def boolean(field: str, value: Any, budget: _Budget) -> None:
    if not isinstance(value, bool):
        raise refuse(field, f"must be true or false, got {_short(value)}.")


def number(field: str, value: Any, budget: _Budget) -> None:
    if not _is_number(value):
        raise refuse(field, f"must be a finite number, got {_short(value)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dropout(field: str, value: Any, budget: _Budget) -> None:
    if not (_is_number(value) and 0 <= value < 1):
        raise refuse(field, f"must be a number in [0, 1), got {_short(value)}.")


def checked_elsewhere(field: str, value: Any, budget: _Budget) -> None:
    """r and peft_type: validate.py checks them with the rank limit and the base model."""


def modules(wrapper: str) -> Rule:
    """null, a regex (run whole by PEFT), or a list of module names (matched literally, by suffix)."""

    def rule(field: str, value: Any, budget: _Budget) -> None:
        if value is None:
            return
        if isinstance(value, str):
            compile_pattern(value, field, wrapper, budget)
            return
        _names(field, value)

    return rule


def _names(field: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= PATTERN_LIMIT for v in value):
        raise refuse(field, f"must be a list of module names (at most {PATTERN_LIMIT} characters each) or a regex.")
    if len(value) > MAX_ENTRIES:
        raise refuse(field, f"has {len(value)} entries; the limit is {MAX_ENTRIES}.")


def names(field: str, value: Any, budget: _Budget) -> None:
    if value is not None:
        _names(field, value)


def pattern_map(values: Callable[[Any], bool], what: str) -> Rule:
    """rank_pattern / alpha_pattern: {regex key: value}; each key run by PEFT and vLLM inside their wrapper."""

    def rule(field: str, value: Any, budget: _Budget) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            raise refuse(field, "must be an object mapping module-name patterns to values.")
        if len(value) > MAX_ENTRIES:
            raise refuse(field, f"has {len(value)} keys; the limit is {MAX_ENTRIES}.")
        for key, item in value.items():
            compile_pattern(key, field, KEY, budget)
            if not values(item):
                raise refuse(field, f"value for {key[:64]!r} must be {what}, got {_short(item)}.")

    return rule


def layers_pattern(field: str, value: Any, budget: _Budget) -> None:
    if value is None:
        return
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns) or len(patterns) > 64:
        raise refuse(field, "must be a regex or a list of at most 64 regexes.")
    for p in patterns:
        compile_pattern(p, field, LAYERS, budget)


def layer_indices(field: str, value: Any, budget: _Budget) -> None:
    def index(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1_000_000

    if value is None or index(value) or (isinstance(value, list) and len(value) <= 4096 and all(map(index, value))):
        return
    raise refuse(field, "must be a layer index or a list of at most 4096 layer indices.")


def init_weights(field: str, value: Any, budget: _Budget) -> None:
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in WEIGHT_ONLY_INITS):
        return
    raise refuse(
        field,
        f"is {_short(value)}: the engine serves true, false and {', '.join(WEIGHT_ONLY_INITS)} (vLLM refuses the "
        "rest too). Inits such as PiSSA, OLoRA, CorDA, Astra and LoftQ change the base model's weights when the "
        "adapter is loaded, which the engine does not do: convert it to a plain LoRA with PEFT's "
        "path_initial_model_for_weight_conversion, or use true if the served base already holds those weights.",
    )


def scalars(field: str, value: Any, budget: _Budget) -> None:
    """A training-time or runtime sub-config (EVA, LoRA-GA, VeLoRA, runtime): a flat object; nothing in it changes
    the adapter's weights or how they are applied."""
    flat = (
        isinstance(value, dict)
        and len(value) <= 64
        and all(isinstance(v, (str, int, float, bool)) or v is None for v in value.values())
    )
    if value is not None and not flat:
        raise refuse(field, "must be null or a flat object of at most 64 settings.")


def auto_mapping(field: str, value: Any, budget: _Budget) -> None:
    """What peft writes for a model saved without task_type; PEFT's AutoPeftModel imports `parent_library`."""
    if value is None:
        return
    ok = (
        isinstance(value, dict) and set(value) == {"base_model_class", "parent_library"}
        and isinstance(cls := value["base_model_class"], str) and cls.isidentifier()
        and isinstance(lib := value["parent_library"], str) and len(lib) <= 128
        and (lib == "transformers" or lib.startswith("transformers."))
    )  # fmt: skip
    if not ok:
        raise refuse(field, "must be null or name a transformers model class (parent_library 'transformers...').")


def task_type(field: str, value: Any, budget: _Budget) -> None:
    if value is not None and value != "CAUSAL_LM":
        raise refuse(field, f"is {_short(value)}: Governor serves causal language models (CAUSAL_LM or null).")


def positive_int(field: str, value: Any, budget: _Budget) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise refuse(field, f"must be a positive integer, got {_short(value)}.")


def _rank_value(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # range: validate.py, against the rank limit


NOT_LORA = "Governor serves plain LoRA adapters (lora_A/lora_B matrices on linear modules)"
FIELDS: dict[str, Rule] = {
    # PeftConfig: identity and bookkeeping
    "peft_type": checked_elsewhere,
    "peft_version": string(64),
    "task_type": task_type,
    "base_model_name_or_path": string(1024),
    "revision": string(256),
    "inference_mode": boolean,
    "auto_mapping": auto_mapping,
    # the LoRA itself
    "r": checked_elsewhere,
    "lora_alpha": number,
    "lora_dropout": dropout,
    "target_modules": modules(FULL),
    "exclude_modules": modules(FULL),
    "rank_pattern": pattern_map(_rank_value, "an integer rank"),
    "alpha_pattern": pattern_map(_is_number, "a finite number"),
    "layers_to_transform": layer_indices,
    "layers_pattern": layers_pattern,
    "target_parameters": names,
    "use_rslora": boolean,
    "fan_in_fan_out": boolean,  # how the base stores its weight; LoRA tensors have the same shapes either way
    "ensure_weight_tying": boolean,
    "init_lora_weights": init_weights,
    "eva_config": scalars,
    "lora_ga_config": scalars,
    "velora_config": scalars,
    "loftq_config": only(None, {}, why="LoftQ changes the base model's weights, which the engine does not do."),
    "runtime_config": scalars,  # not saved by peft 0.21 or 0.22, by some earlier releases
    "qalora_group_size": positive_int,
    "megatron_core": only(None, "megatron.core", why="PEFT imports the module it names."),
    # features vLLM does not serve (it refuses most of them at load): refused here first, with the reason
    "bias": only("none", why="base-model biases are not served (vLLM refuses them too)."),
    "use_dora": only(False, why="DoRA is not served (vLLM does not support it)."),
    "lora_bias": only(False, why="a lora_B bias is not served (vLLM does not support lora_bias)."),
    "modules_to_save": only(None, [], why=f"full copies of modules are not served; {NOT_LORA}."),
    "trainable_token_indices": only(None, [], {}, why=f"trainable token embeddings are not served; {NOT_LORA}."),
    "alora_invocation_tokens": only(None, [], why="Activated LoRA (aLoRA) is not served (vLLM does not support it)."),
    "layer_replication": only(None, [], why="layer replication is not served (vLLM does not support it)."),
    "use_qalora": only(False, why="QALoRA is not served (vLLM does not support it)."),
    "use_bdlora": only(None, False, {}, why="block-diagonal LoRA is not served (vLLM does not support it)."),
    "megatron_config": only(None, why=f"Megatron tensor-parallel layers are not served; {NOT_LORA}."),
    "corda_config": only(None, why="CorDA changes the base model's weights, which the engine does not do."),
    "kasa_config": only(None, why="KaSA changes the base model's weights, which the engine does not do."),
    "astra_config": only(None, why="Astra changes the base model's weights, which the engine does not do."),
    "monteclora_config": only(None, why=f"MonteCLoRA's sampling is not served; {NOT_LORA}."),
    "arrow_config": only(None, why=f"Arrow routing across adapters is not served; {NOT_LORA}."),
    # written by early PEFT releases (alpaca-lora era adapters); training-time only
    "enable_lora": only(None, why=f"merged-layer LoRA (enable_lora) is not served; {NOT_LORA}."),
    "merge_weights": boolean,
}
