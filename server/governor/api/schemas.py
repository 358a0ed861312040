"""Request models for the OpenAI routes: the fields Governor checks, everything else passed through.

Bounds that depend on settings (max_tokens, n, stop count…) are checked in `check_limits`, so they
are defined once and reported with the field name like the static ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from governor.errors import InvalidRequest
from governor.settings import Settings

# Engine-side hooks Governor sets itself; a client reaching them could change templates or run
# arbitrary processors on a shared engine.
ENGINE_FIELDS = frozenset(
    {"vllm_xargs", "logits_processors", "chat_template", "chat_template_kwargs", "kv_transfer_params",
     "ec_transfer_params", "mm_processor_kwargs", "return_tokens_as_token_ids", "request_id"}
)  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=64)
    content: str | list[Any] | None = None


class _Generation(BaseModel):
    """Fields common to chat and completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    decoding_preset: str | None = Field(None, min_length=1, max_length=64)

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def wants_continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def output_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def assemblable(self) -> bool:
        """Whether a non-streaming answer can be rebuilt from a stream (tools and schemas are left alone)."""
        return not self.tools and not self.response_format


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: StrictBool | None = None
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompt_count(self) -> int:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            return len(p)
        return 1

    def assemblable(self) -> bool:
        return not self.echo and not self.best_of and "prompt_logprobs" not in (self.model_extra or {})


def check_limits(req: _Generation, raw: dict[str, Any], settings: Settings) -> None:
    """Settings-dependent bounds and refused engine hooks, each error naming its field."""
    allowed = set(settings.allow_engine_fields)
    for name in ENGINE_FIELDS.intersection(raw):
        if name not in allowed:
            raise InvalidRequest(
                f"'{name}' is set by Governor and cannot be sent by clients (an operator can allow it with "
                "GOVERNOR_ALLOW_ENGINE_FIELDS).",
                param=name,
            )
    limit = req.output_limit()
    if limit is not None and limit > settings.max_tokens_limit:
        param = "max_completion_tokens" if raw.get("max_completion_tokens") else "max_tokens"
        raise InvalidRequest(f"'{param}' must be at most {settings.max_tokens_limit}.", param=param)
    if req.n > settings.max_n:
        raise InvalidRequest(f"'n' must be at most {settings.max_n}.", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > settings.max_stop:
        raise InvalidRequest(f"'stop' may hold at most {settings.max_stop} strings.", param="stop")
    if any(len(s) > 256 for s in stops):
        raise InvalidRequest("each 'stop' string must be at most 256 characters.", param="stop")
    logprobs = getattr(req, "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs", None)
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > settings.max_logprobs:
        param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise InvalidRequest(f"'{param}' must be at most {settings.max_logprobs}.", param=param)
    if isinstance(req, ChatCompletionRequest) and len(req.messages) > settings.max_messages:
        raise InvalidRequest(f"'messages' may hold at most {settings.max_messages} entries.", param="messages")


Kind = Literal["chat", "completions"]
