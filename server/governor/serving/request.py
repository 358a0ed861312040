"""The typed generation requests: every field Governor passes is declared here with its bound.

A field a client may send is in one of four places: declared on a model below (checked and passed
to vLLM), in `DROPPED` (accepted because the openai client or LangChain sends it, not passed: vLLM
would ignore it, and keeping it out keeps the upstream body bounded), one of the policy's controls
(`decoding_preset`, `dry_*`, `loop_*`… checked by the policy), or refused with a 400 naming it.
An operator may let more through with GOVERNOR_ALLOW_FIELDS (unchecked: their size is the body's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError

from governor.endpoint import CHAT, COMPLETIONS, Endpoint, Kind
from governor.errors import InvalidRequest, from_pydantic
from governor.policy.builder import ENGINE_FIELDS, GOVERNOR_FIELDS, Policy
from governor.settings import Settings
from governor.stream.loop_detector import LoopConfig
from governor.target import Target

# Size limits of list and map fields (per request), defined once.
MAX_LOGIT_BIAS = 1024
MAX_TOKEN_IDS = 1024  # allowed_token_ids, logprob_token_ids
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64
MAX_WORD_CHARS = 256
MAX_TOOLS = 128
MAX_CONTENT_PARTS = 256
MAX_TOOL_CALLS = 128
MAX_DOCUMENTS = 64
MAX_PROMPTS = 4096  # list length; the sequence cap is what really bounds a batch
MAX_STRUCTURED_BYTES = 64 * 1024  # a JSON schema, regex, grammar or choice list, serialized
MAX_TOOLS_BYTES = 256 * 1024
MAX_DROPPED_BYTES = 16 * 1024  # each accepted-but-dropped field

# Accepted for compatibility, never sent upstream (vLLM's request models ignore them).
DROPPED = frozenset(
    {"metadata", "store", "service_tier", "modalities", "prediction", "audio", "web_search_options", "verbosity",
     "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "moderation",
     "functions", "function_call"}
)  # fmt: skip

# Refused even though vLLM takes them, and why (an operator can still allow one with GOVERNOR_ALLOW_FIELDS).
REFUSED = {
    "cache_salt": "the prefix-cache salt is the operator's (GOVERNOR_CACHE_SALT_PER_KEY); a client choosing its "
    "own could share a salt with another tenant",
    "use_beam_search": "beam search multiplies a request's cost by its width and bypasses the decoding policy "
    "on a shared engine",
    "priority": "a client may not choose its own scheduling priority on a shared engine",
    "media_io_kwargs": "it configures how the engine fetches and decodes media: the operator's choice",
    "prompt_embeds": "raw tensors a client uploads are deserialized inside the engine and bypass the tokenizer's "
    "bounds",
}

_NOT_FORWARDED: dict[str, Any] = {**dict.fromkeys(DROPPED, True), "stream_options": {"include_obfuscation": True}}
_Text = Annotated[str, Field(max_length=MAX_WORD_CHARS)]
_TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _bounded_json(limit: int) -> AfterValidator:
    def check(value: Any) -> Any:
        if value is not None and len(orjson.dumps(value)) > limit:
            raise ValueError(f"must be at most {limit} bytes as JSON")
        return value

    return AfterValidator(check)


_Structured = Annotated[Any, _bounded_json(MAX_STRUCTURED_BYTES)]
_Dropped = Annotated[Any, _bounded_json(MAX_DROPPED_BYTES)]


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What goes to the engine: the body, whether it is streamed upstream, and the loop detector (None = off)."""

    body: dict[str, Any]
    stream: bool
    loop: LoopConfig | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # OpenAI's; accepted and dropped (vLLM adds no padding)


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_call_id, reasoning_content…) pass, bounded by the body size."""

    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=64)
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOL_CALLS)


class GenerationRequest(BaseModel):
    """Fields common to chat and completions."""

    model_config = ConfigDict(extra="allow")
    endpoint: ClassVar[Endpoint]
    default_max_tokens: ClassVar[int | None] = None  # vLLM's default when max_tokens is unset (None: the context)

    model: str = Field(min_length=1, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    length_penalty: float | None = Field(None, ge=-10, le=10)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[Annotated[str, Field(max_length=256)]] | None = None
    stop_token_ids: list[_TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    bad_words: list[_Text] | None = Field(None, max_length=MAX_BAD_WORDS)
    logit_bias: dict[Annotated[str, Field(max_length=16)], Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS
    )
    allowed_token_ids: list[_TokenId] | None = Field(None, min_length=1, max_length=MAX_TOKEN_IDS)
    logprob_token_ids: list[_TokenId] | None = Field(None, max_length=MAX_TOKEN_IDS)
    prompt_logprobs: int | None = Field(None, ge=-1)
    ignore_eos: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    add_special_tokens: StrictBool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    return_token_ids: StrictBool | None = None
    user: str | None = Field(None, max_length=256)
    response_format: _Structured | None = None
    structured_outputs: _Structured | None = None
    guided_json: _Structured | None = None
    guided_regex: Annotated[str, Field(max_length=MAX_STRUCTURED_BYTES)] | None = None
    guided_grammar: Annotated[str, Field(max_length=MAX_STRUCTURED_BYTES)] | None = None
    guided_choice: list[_Text] | None = Field(None, max_length=256)
    guided_whitespace_pattern: Annotated[str, Field(max_length=256)] | None = None
    guided_decoding_backend: Annotated[str, Field(max_length=64)] | None = None
    repetition_detection: dict[str, int] | None = Field(None, max_length=8)
    decoding_preset: str | None = Field(None, min_length=1, max_length=64)
    # accepted, dropped (see DROPPED)
    metadata: _Dropped | None = None
    store: _Dropped | None = None
    service_tier: _Dropped | None = None
    safety_identifier: _Dropped | None = None
    prompt_cache_key: _Dropped | None = None
    prompt_cache_retention: _Dropped | None = None
    prompt_cache_options: _Dropped | None = None

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def wants_continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def output_limit(self) -> int | None:
        return self.max_tokens

    def prompt_count(self) -> int:
        return 1

    def sequences(self) -> int:
        """Sequences the engine will run for this request: prompts x n (x best_of where larger)."""
        return self.prompt_count() * self.n

    def prompt_estimate(self) -> int:
        """A cheap upper-ish estimate of prompt tokens (≈4 characters a token) for quota charging."""
        return 1

    def expected_tokens(self, settings: Settings) -> int:
        """What this request may cost at most, for token quotas: prompts + outputs of every sequence."""
        out = self.output_limit() or self.default_max_tokens or min(settings.max_tokens_limit, settings.max_model_len)
        return self.prompt_estimate() + out * self.sequences()

    def assemblable(self) -> bool:
        """Whether a non-streaming answer can be rebuilt from a stream."""
        return True

    def body(self) -> dict[str, Any]:
        """The client's fields for the policy (dropped ones left out; Governor's controls kept for it)."""
        return self.model_dump(exclude_unset=True, exclude=_NOT_FORWARDED)

    def to_upstream(self, policy: Policy, target: Target, cache_salt: str | None = None) -> UpstreamCall:
        """The engine's body: the policy's plan for this target (preset layers, stops, processor args)
        applied to the client's fields, addressed to the target's upstream model."""
        decision = policy.build(self.body(), kind=self.endpoint.kind, profile=target.profile)
        body = decision.body
        body["model"] = target.upstream_model
        if cache_salt is not None:
            # A client's own salt (refused unless an operator allows the field) can split its key's cache
            # further, never join another key's.
            own = body.get("cache_salt")
            body["cache_salt"] = f"{cache_salt}:{own}" if isinstance(own, str) and own else cache_salt
        # A loop can only be cut in a stream: a non-streaming answer is streamed upstream and assembled.
        stream = self.stream or (decision.loop is not None and self.assemblable())
        if stream:
            opts: dict[str, Any] = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            if decision.loop is not None:
                opts["continuous_usage_stats"] = True  # exact usage even when Governor cuts the stream
            body["stream"], body["stream_options"] = True, opts
        return UpstreamCall(body, stream, decision.loop)


class ChatCompletionRequest(GenerationRequest):
    endpoint: ClassVar[Endpoint] = CHAT

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    tools: Annotated[list[dict[str, Any]], _bounded_json(MAX_TOOLS_BYTES)] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: _Structured | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: Annotated[str, Field(max_length=16)] | None = None
    include_reasoning: StrictBool | None = None
    thinking_token_budget: int | None = Field(None, ge=0)
    echo: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None
    documents: list[dict[str, Any]] | None = Field(None, max_length=MAX_DOCUMENTS)
    modalities: _Dropped | None = None
    prediction: _Dropped | None = None
    audio: _Dropped | None = None
    web_search_options: _Dropped | None = None
    verbosity: _Dropped | None = None
    moderation: _Dropped | None = None
    functions: _Dropped | None = None
    function_call: _Dropped | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_estimate(self) -> int:
        chars = 0
        for m in self.messages:
            if isinstance(m.content, str):
                chars += len(m.content)
            elif m.content:
                chars += sum(len(p.get("text") or "") for p in m.content if isinstance(p.get("text"), str))
        return chars // 4 + 4 * len(self.messages)

    def assemblable(self) -> bool:
        # tool calls and structured output are left to vLLM's own non-streaming answer
        return not self.tools and not self.response_format


class CompletionRequest(GenerationRequest):
    endpoint: ClassVar[Endpoint] = COMPLETIONS
    default_max_tokens: ClassVar[int | None] = 16

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[_TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    echo: StrictBool | None = None
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = Field(None, max_length=4096)

    def prompt_count(self) -> int:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            return len(p)
        return 1

    def sequences(self) -> int:
        return self.prompt_count() * max(self.n, self.best_of or 0)

    def prompt_estimate(self) -> int:
        p = self.prompt
        if isinstance(p, str):
            return len(p) // 4 + 1
        if p and isinstance(p[0], int):
            return len(p)
        return sum(len(x) // 4 + 1 if isinstance(x, str) else len(x) for x in p if not isinstance(x, int))

    def assemblable(self) -> bool:
        return not self.echo and not self.best_of and self.prompt_logprobs is None


MODELS: dict[Kind, type[GenerationRequest]] = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


def parse_request(kind: Kind, raw: dict[str, Any], settings: Settings) -> GenerationRequest:
    """The client's body as a typed request, every bound checked; InvalidRequest names the field."""
    try:
        req = MODELS[kind].model_validate(raw)
    except ValidationError as exc:
        raise from_pydantic(exc.errors()) from exc
    check_fields(req, settings)
    check_limits(req, settings)
    return req


def check_fields(req: GenerationRequest, settings: Settings) -> None:
    """Fields nobody declared: Governor's controls (the policy checks them), operator-allowed ones, or a 400."""
    extra = req.model_extra
    if not extra:
        return
    allowed = set(settings.allow_fields)
    engine_allowed = set(settings.allow_engine_fields)
    for name in extra:
        if name in GOVERNOR_FIELDS or name in allowed:
            continue
        if name in ENGINE_FIELDS:
            if name in engine_allowed:
                continue
            raise InvalidRequest(
                f"'{name}' is set by Governor and cannot be sent by clients (an operator can allow it with "
                "GOVERNOR_ALLOW_ENGINE_FIELDS).",
                param=name,
            )
        why = REFUSED.get(name)
        if why is not None:
            raise InvalidRequest(f"'{name}' is not accepted here: {why}.", param=name, code="field_not_allowed")
        raise InvalidRequest(
            f"Unknown field '{name[:64]}' (an operator can allow it with GOVERNOR_ALLOW_FIELDS).",
            param=name[:64],
            code="unknown_field",
        )


def check_limits(req: GenerationRequest, settings: Settings) -> None:
    """Settings-dependent bounds, each error naming its field."""
    limit = req.output_limit()
    if limit is not None and limit > settings.max_tokens_limit:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise InvalidRequest(f"'{param}' must be at most {settings.max_tokens_limit}.", param=param)
    if req.min_tokens is not None and req.min_tokens > settings.max_tokens_limit:
        raise InvalidRequest(f"'min_tokens' must be at most {settings.max_tokens_limit}.", param="min_tokens")
    if req.n > settings.max_n:
        raise InvalidRequest(f"'n' must be at most {settings.max_n}.", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > settings.max_stop:
        raise InvalidRequest(f"'stop' may hold at most {settings.max_stop} strings.", param="stop")
    for name in ("top_logprobs", "logprobs", "prompt_logprobs"):
        value = getattr(req, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > settings.max_logprobs:
            raise InvalidRequest(f"'{name}' must be at most {settings.max_logprobs}.", param=name)
    if isinstance(req, ChatCompletionRequest) and len(req.messages) > settings.max_messages:
        raise InvalidRequest(f"'messages' may hold at most {settings.max_messages} entries.", param="messages")
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of > settings.max_n:
        raise InvalidRequest(f"'best_of' must be at most {settings.max_n}.", param="best_of")
    seqs = req.sequences()
    if seqs > settings.max_request_sequences:
        # name the field that multiplies: the prompt list when it is a batch, else n
        param = "prompt" if req.prompt_count() > 1 else ("best_of" if seqs > req.n else "n")
        raise InvalidRequest(
            f"This request asks for {seqs} sequences (prompts x n); at most {settings.max_request_sequences} per "
            f"request: send fewer prompts or a smaller n.",
            param=param,
            code="too_many_sequences",
        )
