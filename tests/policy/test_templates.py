from __future__ import annotations

from pathlib import Path

import pytest

from governor.policy.templates import FAMILIES, detect_family, get_family

LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}{% endif %}{% endfor %}"
)
ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] "
    "+ '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + "
    "eos_token + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
VICUNA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_embedded_chat_template_is_chatml(embedded_dir: Path) -> None:
    template = (embedded_dir / "chat_template.jinja").read_text()
    assert detect_family(template, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).name == "chatml"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (LLAMA3, "llama3"),
        (GEMMA, "gemma"),
        (PHI3, "phi3"),
        (MISTRAL, "mistral"),
        (LLAMA2, "mistral"),
        (ALPACA, "alpaca"),
        (VICUNA, "vicuna"),
        ("{{ messages[0]['content'] }}", "plain"),
    ],
)
def test_detect_from_template_text(template: str, expected: str) -> None:
    assert detect_family(template, []).name == expected


def test_llama3_template_wins_over_chatml_tokens_in_vocab() -> None:
    assert detect_family(LLAMA3, ["<|im_start|>", "<|im_end|>"]).name == "llama3"


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "chatml"),
        (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "llama3"),
        (["<bos>", "<start_of_turn>", "<end_of_turn>"], "gemma"),
        (["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], "phi3"),
        (["<s>", "</s>", "[INST]", "[/INST]"], "mistral"),
        (["<s>", "</s>", "<unk>"], "plain"),
        ([], "plain"),
    ],
)
def test_detect_from_special_tokens_without_template(tokens: list[str], expected: str) -> None:
    assert detect_family(None, tokens).name == expected
    assert detect_family("{{ unknown }}", tokens).name == expected


def test_family_stops() -> None:
    assert FAMILIES["chatml"].stops == ("<|im_end|>", "<|im_start|>")
    assert set(FAMILIES["llama3"].stops) >= {"<|eot_id|>", "<|eom_id|>"}
    assert "<end_of_turn>" in FAMILIES["gemma"].stops
    assert "<|end|>" in FAMILIES["phi3"].stops
    assert "</s>" in FAMILIES["mistral"].stops
    assert "\n### Instruction:" in FAMILIES["alpaca"].stops
    assert "\n### Input:" in FAMILIES["alpaca"].stops
    assert "\nUSER:" in FAMILIES["vicuna"].stops
    assert FAMILIES["plain"].stops == ()
    assert all(f.description for f in FAMILIES.values())


def test_get_family_names_and_aliases() -> None:
    assert get_family("ChatML") is FAMILIES["chatml"]
    assert get_family("llama2") is FAMILIES["mistral"]
    assert get_family("nope") is None
