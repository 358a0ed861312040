from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from governor.policy.tokenizer_info import MAX_BREAKER_IDS, TokenizerInfo

TINY_VOCAB = ["<unk>", "<|im_start|>", "<|im_end|>", "hello", "1", "23", ",", "\n", " ", "a:b", ":", "x\n", "½", "é"]


def _tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


def test_embedded_model(smol: TokenizerInfo) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == {2}
    assert smol.family.name == "chatml"
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    assert smol.special_id("<|im_end|>") == 2
    assert smol.special_id("hello") is None
    assert {0, 1, 2} <= smol.special_token_ids
    assert smol.has_vocab


def test_embedded_digit_punct_ids(smol: TokenizerInfo) -> None:
    ids = set(smol.digit_punct_ids)
    texts = smol._texts
    assert smol._text_ids["1"] in ids and smol._text_ids[","] in ids and smol._text_ids["\n"] in ids
    assert smol._text_ids["hello"] not in ids
    assert not ids & smol.special_token_ids
    assert all(texts[i] and not any(c.isalpha() for c in texts[i]) for i in ids)


def test_embedded_breaker_ids(smol: TokenizerInfo) -> None:
    breakers = ["\n", ":", '"', "*"]
    ids = smol.breaker_ids(breakers)
    assert smol._text_ids["\n"] in ids and smol._text_ids[":"] in ids
    assert len(ids) <= MAX_BREAKER_IDS + len(breakers)
    assert all(any(b in smol._texts[i] for b in breakers) for i in ids)
    assert list(ids) == sorted(set(ids))
    assert smol.breaker_ids(breakers) is ids  # cached
    assert smol.breaker_ids([]) == ()


def test_tiny_tokenizer_lists() -> None:
    info = TokenizerInfo(
        vocab_size=len(TINY_VOCAB), special_tokens={"<|im_start|>": 1, "<|im_end|>": 2}, tokenizer=_tiny_tokenizer()
    )
    ids = {TINY_VOCAB[i] for i in info.digit_punct_ids}
    assert ids == {"1", "23", ",", "\n", " ", ":", "½"}
    assert {TINY_VOCAB[i] for i in info.breaker_ids([":"])} == {"a:b", ":"}
    assert {TINY_VOCAB[i] for i in info.breaker_ids(["\n", ":"])} == {"a:b", ":", "\n", "x\n"}
    assert info.breaker_ids(["<|im_end|>"]) == ()  # special tokens never match
    assert info.family.name == "chatml"


def test_generic() -> None:
    info = TokenizerInfo.generic()
    assert info.vocab_size is None
    assert info.family.name == "plain"
    assert info.digit_punct_ids == ()
    assert info.breaker_ids(["\n"]) == ()
    assert not info.has_vocab


def test_load_folder(tmp_path: Path) -> None:
    _tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ '### Instruction:\\n' + m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": [{"name": "default", "template": template}]})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 64}))
    info = TokenizerInfo.load(tmp_path)
    assert info.vocab_size == 64  # the model's (padded) embedding size, not the tokenizer's
    assert info.eos_token_ids == {1, 2, 4}
    assert info.chat_template == template
    assert info.family.name == "alpaca"


def test_load_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "<start_of_turn>user",
                "added_tokens_decoder": {"106": {"content": "<start_of_turn>", "special": True}},
            }
        )
    )
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 1000}}))
    info = TokenizerInfo.load(tmp_path)
    assert info.vocab_size == 1000
    assert info.family.name == "gemma"
    assert info.special_id("<start_of_turn>") == 106
    assert not info.has_vocab and info.breaker_ids(["\n"]) == ()


def test_load_missing_folder_is_generic(tmp_path: Path) -> None:
    info = TokenizerInfo.load(tmp_path / "absent")
    assert info.vocab_size is None and info.family.name == "plain"
