"""The two generation endpoints and what differs between them, held once (no `kind == "chat"` branches).

A bottom-layer module: policy, stream, the request models and the service all read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["chat", "completions"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI generation endpoint: where it lives upstream and the objects it returns."""

    kind: Kind
    path: str
    response_object: str  # the non-streaming response's "object"
    chunk_object: str  # each streamed event's object
    text_key: str  # where a streamed choice carries its text: choice["delta"]["content"] or choice["text"]

    def chunk_text(self, choice: dict[str, object]) -> str | None:
        """The text a streamed choice adds."""
        if self.kind == "chat":
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        return text if isinstance(text, str) else None


CHAT = Endpoint("chat", "/v1/chat/completions", "chat.completion", "chat.completion.chunk", "content")
COMPLETIONS = Endpoint("completions", "/v1/completions", "text_completion", "text_completion", "text")
ENDPOINTS: dict[Kind, Endpoint] = {"chat": CHAT, "completions": COMPLETIONS}
