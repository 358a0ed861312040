"""Rebuilds a non-streaming response from streamed chunks.

Governor streams non-streaming requests upstream so a loop can be cut early; the client still gets
the ordinary `chat.completion` / `text_completion` object.
"""

from __future__ import annotations

from typing import Any


class ChoiceParts:
    """Everything one choice's deltas carried."""

    __slots__ = ("finish_reason", "logprobs", "reasoning", "role", "stop_reason", "text", "tool_calls")

    def __init__(self) -> None:
        self.role = "assistant"
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def add_logprobs(self, lp: dict[str, Any] | None) -> None:
        if not lp:
            return
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in lp.items():
            if isinstance(value, list):
                self.logprobs.setdefault(key, []).extend(value)

    def add_tool_calls(self, calls: list[dict[str, Any]]) -> None:
        for call in calls:
            slot = self.tool_calls.setdefault(
                int(call.get("index", 0)), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            fn = call.get("function") or {}
            if fn.get("name"):
                slot["function"]["name"] += fn["name"]
            if fn.get("arguments"):
                slot["function"]["arguments"] += fn["arguments"]


class Assembler:
    """Accumulates parsed chunks; `result()` gives the non-streaming body."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.choices: dict[int, ChoiceParts] = {}
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None

    def choice(self, index: int) -> ChoiceParts:
        parts = self.choices.get(index)
        if parts is None:
            parts = self.choices[index] = ChoiceParts()
        return parts

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            parts = self.choice(int(ch.get("index", 0)))
            if self.kind == "chat":
                delta = ch.get("delta") or {}
                if delta.get("role"):
                    parts.role = delta["role"]
                if delta.get("content"):
                    parts.text.append(delta["content"])
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    parts.reasoning.append(reasoning)
                if delta.get("tool_calls"):
                    parts.add_tool_calls(delta["tool_calls"])
            elif ch.get("text"):
                parts.text.append(ch["text"])
            parts.add_logprobs(ch.get("logprobs"))
            if ch.get("finish_reason") is not None:
                parts.finish_reason = ch["finish_reason"]
                parts.stop_reason = ch.get("stop_reason")

    def result(self) -> dict[str, Any]:
        choices = [self._choice_body(i, self.choices[i]) for i in sorted(self.choices)]
        body: dict[str, Any] = {
            "id": self.head.get("id"),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.head.get("created"),
            "model": self.head.get("model"),
            "choices": choices,
            "usage": self.usage,
        }
        if self.head.get("system_fingerprint"):
            body["system_fingerprint"] = self.head["system_fingerprint"]
        return body

    def _choice_body(self, index: int, parts: ChoiceParts) -> dict[str, Any]:
        text = "".join(parts.text)
        if self.kind != "chat":
            return {
                "index": index,
                "text": text,
                "logprobs": parts.logprobs,
                "finish_reason": parts.finish_reason,
                "stop_reason": parts.stop_reason,
            }
        message: dict[str, Any] = {"role": parts.role, "content": text if text or not parts.tool_calls else None}
        if parts.reasoning:
            message["reasoning_content"] = "".join(parts.reasoning)
        if parts.tool_calls:
            message["tool_calls"] = [parts.tool_calls[i] for i in sorted(parts.tool_calls)]
        return {
            "index": index,
            "message": message,
            "logprobs": parts.logprobs,
            "finish_reason": parts.finish_reason,
            "stop_reason": parts.stop_reason,
        }
