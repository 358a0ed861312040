"""Prompt-template families and the stop strings that end a turn in each.

A model fine-tuned on one template keeps writing the next turn ("### Instruction: ...",
"<|im_start|>user ...") unless generation stops at that template's turn markers. For chat requests
on the served model vLLM already stops at EOS; the stops matter for raw-prompt completions and for
adapters trained on another template than the base model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FAMILIES", "TemplateFamily", "detect_family", "get_family"]


@dataclass(frozen=True, slots=True)
class TemplateFamily:
    """One prompt-template family: its name, the stops that end a turn, and how to recognise it."""

    name: str
    stops: tuple[str, ...]
    description: str
    markers: tuple[str, ...] = ()  # all present in a chat template's text → this family
    tokens: tuple[str, ...] = ()  # all among the special tokens → this family (no usable template)


# Detection order matters: earlier entries win when several match (a Llama-3 template never holds
# "<|im_start|>", but a vocabulary may carry tokens of more than one family).
_ORDER = (
    TemplateFamily(
        "llama3",
        ("<|eot_id|>", "<|eom_id|>", "<|start_header_id|>"),
        "Llama 3.x header/eot template",
        markers=("<|start_header_id|>",),
        tokens=("<|start_header_id|>", "<|eot_id|>"),
    ),
    TemplateFamily(
        "gemma",
        ("<end_of_turn>", "<start_of_turn>"),
        "Gemma start_of_turn/end_of_turn template",
        markers=("<start_of_turn>",),
        tokens=("<start_of_turn>", "<end_of_turn>"),
    ),
    TemplateFamily(
        "phi3",
        ("<|end|>", "<|user|>", "<|endoftext|>"),
        "Phi-3 <|user|>/<|assistant|>/<|end|> template",
        markers=("<|user|>", "<|end|>"),
        tokens=("<|user|>", "<|assistant|>", "<|end|>"),
    ),
    TemplateFamily(
        "chatml",
        ("<|im_end|>", "<|im_start|>"),
        "ChatML <|im_start|>role ... <|im_end|> (Qwen, SmolLM, Hermes, ...)",
        markers=("<|im_start|>",),
        tokens=("<|im_start|>", "<|im_end|>"),
    ),
    TemplateFamily(
        "mistral",
        ("</s>", "[INST]"),
        "Mistral / Llama-2 [INST] ... [/INST] template",
        markers=("[INST]",),
        tokens=("[INST]", "[/INST]"),
    ),
    TemplateFamily(
        "alpaca",
        ("\n### Instruction:", "\n### Input:", "\n### Response:"),
        "Alpaca '### Instruction: / ### Response:' template",
        markers=("### Instruction:",),
    ),
    TemplateFamily(
        "vicuna",
        ("\nUSER:",),
        "Vicuna 'USER: ... ASSISTANT:' template",
        markers=("USER:", "ASSISTANT:"),
    ),
    TemplateFamily("plain", (), "No known template: no template stops"),
)

FAMILIES: dict[str, TemplateFamily] = {family.name: family for family in _ORDER}
PLAIN = FAMILIES["plain"]
_ALIASES = {"llama2": "mistral", "llama-2": "mistral", "llama-3": "llama3", "phi-3": "phi3", "none": "plain"}


def get_family(name: str) -> TemplateFamily | None:
    """The family called `name` (case-insensitive, a few aliases such as 'llama2'), or None."""
    key = name.strip().lower()
    return FAMILIES.get(_ALIASES.get(key, key))


def detect_family(chat_template: str | None, special_tokens: Iterable[str]) -> TemplateFamily:
    """The family of a tokenizer, from its chat template text, else from its special tokens."""
    if chat_template:
        for family in _ORDER:
            if family.markers and all(marker in chat_template for marker in family.markers):
                return family
    specials = set(special_tokens)
    for family in _ORDER:
        if family.tokens and specials.issuperset(family.tokens):
            return family
    return PLAIN
