"""What the decoding policy needs to know about the served model's tokenizer.

Read with the `tokenizers` library (Rust, no transformers import) from a local model folder, so
startup stays well under a second; a hub name or a remote engine gets :meth:`TokenizerInfo.generic`
(vocabulary unknown: id checks and token-level lists are skipped).
"""

from __future__ import annotations

import bisect
import json
import logging
import string
import unicodedata
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from governor.policy.templates import PLAIN, TemplateFamily, detect_family

__all__ = ["MAX_BREAKER_IDS", "MAX_DIGIT_PUNCT_IDS", "TokenizerInfo"]

log = logging.getLogger("governor.policy")

# Token lists travel in every request's vllm_xargs: keep them short. Ids are kept lowest first,
# which for BPE vocabularies means the most frequent merges.
MAX_BREAKER_IDS = 256
MAX_DIGIT_PUNCT_IDS = 4096
_BREAKER_CACHE = 64  # distinct breaker lists remembered (a request may send its own)

_PLAIN_CHARS = frozenset(string.punctuation + string.digits + string.whitespace)


def _digit_punct(text: str) -> bool:
    """Whether text is non-empty and made only of digits, punctuation and whitespace."""
    if not text:
        return False
    for ch in text:
        if ch in _PLAIN_CHARS:
            continue
        # P* punctuation, N* numbers, Z* separators; U+FFFD (a partial UTF-8 byte) is So.
        if unicodedata.category(ch)[0] not in "PNZ":
            return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _chat_template(model_dir: Path, tok_config: Mapping[str, Any]) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template") or _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # AddedToken serialised
        return value["content"]
    return None


class TokenizerInfo:
    """Vocabulary facts of the served model: sizes, EOS/special ids, chat template and family."""

    def __init__(
        self,
        *,
        vocab_size: int | None,
        eos_token_ids: Iterable[int] = (),
        special_tokens: Mapping[str, int] | None = None,
        chat_template: str | None = None,
        family: TemplateFamily | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self.special_token_ids: frozenset[int] = frozenset(self.special_tokens.values())
        self.chat_template = chat_template
        self.family = family or detect_family(chat_template, self.special_tokens)
        self._tokenizer = tokenizer
        self._breakers: dict[tuple[str, ...], tuple[int, ...]] = {}

    @classmethod
    def generic(cls) -> TokenizerInfo:
        """No local tokenizer (hub name, remote engine): vocabulary unknown, no template stops."""
        return cls(vocab_size=None, family=PLAIN)

    @classmethod
    def load(cls, model_dir: str | Path) -> TokenizerInfo:
        """Read a local model folder: tokenizer.json, tokenizer_config.json, generation_config.json, config.json."""
        root = Path(model_dir).expanduser()
        if not root.is_dir():
            log.warning("no local model folder at %s: vocabulary checks are off", root)
            return cls.generic()
        tok_config = _read_json(root / "tokenizer_config.json")
        tokenizer = None
        if (root / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
            except Exception as exc:  # a corrupt or too-new file must not stop the gateway
                log.warning("cannot load %s: %s; token-level controls are off", root / "tokenizer.json", exc)
        else:
            log.warning("no tokenizer.json in %s: token-level controls (breakers, exemptions) are off", root)

        special: dict[str, int] = {}
        if tokenizer is not None:
            for token_id, added in tokenizer.get_added_tokens_decoder().items():
                if added.special:
                    special[added.content] = token_id
        else:
            for key, added in (tok_config.get("added_tokens_decoder") or {}).items():
                if isinstance(added, dict) and added.get("special") and str(key).isdigit():
                    special[str(added.get("content"))] = int(key)

        config = _read_json(root / "config.json")
        nested = config.get("text_config")
        text_config: dict[str, Any] = nested if isinstance(nested, dict) else {}
        model_vocab = config.get("vocab_size") or text_config.get("vocab_size")
        # Logits are as wide as the model's embedding, which may be padded past the tokenizer's size.
        vocab_size = model_vocab if isinstance(model_vocab, int) and model_vocab > 0 else None
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

        eos: set[int] = set()
        for source in (_read_json(root / "generation_config.json"), config, text_config):
            value = source.get("eos_token_id")
            eos.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
        eos_text = _token_text(tok_config.get("eos_token"))
        if eos_text is not None:
            eos_id = special.get(eos_text)
            if eos_id is None and tokenizer is not None:
                eos_id = tokenizer.token_to_id(eos_text)
            if eos_id is not None:
                eos.add(eos_id)

        return cls(
            vocab_size=vocab_size,
            eos_token_ids=eos,
            special_tokens=special,
            chat_template=_chat_template(root, tok_config),
            tokenizer=tokenizer,
        )

    @property
    def has_vocab(self) -> bool:
        """Whether token-level lists (breakers, exemptions) can be computed."""
        return self._tokenizer is not None

    def degraded(self) -> list[str]:
        """The anti-loop controls that cannot work fully without the model's tokenizer files."""
        out = []
        if self.family is PLAIN:
            out.append("template stops (the model's chat template family is unknown)")
        if not self.has_vocab:
            out.append("DRY sequence breakers and the penalty's digit/punctuation exemptions (no tokenizer.json)")
        return out

    def special_id(self, text: str) -> int | None:
        """The id of `text` when it is one special token (such a token never shows in output text)."""
        return self.special_tokens.get(text)

    @cached_property
    def _texts(self) -> list[str]:
        """Decoded text of every token id; special tokens as empty strings."""
        tok = self._tokenizer
        if tok is None:
            return []
        size = tok.get_vocab_size(with_added_tokens=True)
        texts: list[str] = tok.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        for token_id in self.special_token_ids:
            if token_id < len(texts):
                texts[token_id] = ""
        return texts

    @cached_property
    def _joined(self) -> tuple[str, list[int]]:
        """All token texts joined, with each text's start offset, to search the vocabulary at C speed."""
        starts, pos = [], 0
        for text in self._texts:
            starts.append(pos)
            pos += len(text) + 1
        return "\x00".join(self._texts), starts

    @cached_property
    def _text_ids(self) -> dict[str, int]:
        """Decoded text → lowest id with that text."""
        ids: dict[str, int] = {}
        for token_id, text in enumerate(self._texts):
            if text:
                ids.setdefault(text, token_id)
        return ids

    @cached_property
    def digit_punct_ids(self) -> tuple[int, ...]:
        """Ids of tokens whose text is only digits, punctuation and whitespace (default exemptions)."""
        ids = [i for i, text in enumerate(self._texts) if _digit_punct(text)]
        return tuple(ids[:MAX_DIGIT_PUNCT_IDS])

    def breaker_ids(self, strings: Iterable[str]) -> tuple[int, ...]:
        """Ids of tokens whose text contains any of `strings` (DRY sequence breakers), capped.

        Each string gets a fair share of :data:`MAX_BREAKER_IDS`, lowest ids first; a token that is
        exactly the string always makes it in.
        """
        key = tuple(dict.fromkeys(s for s in strings if s))
        cached = self._breakers.get(key)
        if cached is not None:
            return cached
        result = self._find_breakers(key)
        if len(self._breakers) >= _BREAKER_CACHE:
            self._breakers.clear()
        self._breakers[key] = result
        return result

    def _find_breakers(self, strings: tuple[str, ...]) -> tuple[int, ...]:
        if not strings or self._tokenizer is None:
            return ()
        joined, starts = self._joined
        share = max(8, MAX_BREAKER_IDS // len(strings))
        found: dict[int, None] = {}
        for s in strings:
            exact = self._text_ids.get(s)
            if exact is not None:
                found[exact] = None
            taken, pos = 0, joined.find(s)
            while pos >= 0 and taken < share:
                token_id = bisect.bisect_right(starts, pos) - 1
                end = starts[token_id] + len(self._texts[token_id])
                if pos + len(s) <= end:  # inside one token, not across the separator
                    if token_id not in found:
                        found[token_id] = None
                        taken += 1
                    pos = joined.find(s, end + 1)
                else:
                    pos = joined.find(s, pos + 1)
        return tuple(sorted(found))
