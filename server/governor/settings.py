"""Governor's one settings object: env prefix GOVERNOR_, CLI flags are generated from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Settings that hold a key: from the environment or a file (SECRET_FILE), never a flag (`ps` shows every
# process's command line to every local user).
SECRETS = ("api_keys", "admin_key", "engine_api_key")


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "governor"


def _split_list(value: object) -> object:
    """Accept comma-separated strings from env/CLI for list fields."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of Governor. Env: GOVERNOR_<NAME>; CLI: --<name-with-dashes>."""

    model_config = SettingsConfigDict(env_prefix="GOVERNOR_", extra="ignore")

    # Listening
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the gateway listens on.")
    relay_workers: int = Field(
        1, ge=1, le=64,
        description="Processes relaying on PORT (SO_REUSEPORT): 1 = the gateway alone; N adds N - 1 relay workers, "
        "the gateway keeping every decision (docs/operating.md). More than 1 pays off past one core's relay load.",
    )  # fmt: skip
    log_level: str = Field("info", description="Logging level (debug, info, warning, error).")

    # Model and engine
    model: str = Field("", description="Model path or hub name; empty = the embedded SmolLM2-135M-Instruct.")
    served_model_name: str = Field("", description="Name clients use in 'model'; default: derived from --model.")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where the embedded model and state live.")
    state_dir: Path | None = Field(None, description="Adapter registry state; default: CACHE_DIR/state.")
    engine_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Existing vLLM server URL(s), comma-separated; empty = start one."
    )
    engine_api_key: str = Field(
        "", description="Key Governor sends to remote engines (ENGINE_URL) as a Bearer token; empty = none."
    )
    engine_api_key_file: Path | None = Field(None, description="A file holding ENGINE_API_KEY (instead of it).")
    engines: int = Field(1, ge=1, le=16, description="Local engine processes to start (ignored with ENGINE_URL).")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Engine profile; auto = gpu if nvidia-smi finds one."
    )
    engine_args: str = Field("", description="Extra arguments for the vLLM server, as one shell-quoted string.")
    engine_port: int = Field(
        0, ge=0, le=65535,
        description="Local engines on loopback TCP ports from this one, reachable by any local user (debugging); "
        "0 = each on a Unix socket only Governor can reach.",
    )  # fmt: skip
    enforce_eager: bool = Field(
        False, description="Skip vLLM graph compilation: faster start, ~17% less throughput on CPU."
    )
    max_model_len: int = Field(4096, ge=64, description="Longest prompt + output the engine accepts.")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache size for the CPU engine (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory share for the GPU engine.")
    engine_start_timeout: float = Field(900.0, gt=0, description="Seconds to wait for an engine to become healthy.")
    restart_backoff_max: float = Field(30.0, gt=0, description="Longest pause between engine restarts (seconds).")

    # LoRA
    lora: bool = Field(True, description="Start the engine with LoRA enabled (costs ~10% throughput on CPU).")
    adapters_dir: Path = Field(Path("adapters"), description="Adapters root, watched for PEFT folders.")
    watch_adapters: bool = Field(True, description="Load/unload adapters when folders appear/disappear.")
    max_loras: int = Field(
        4, ge=1, le=256, description="Adapters in one engine batch (GPU slots, vLLM --max-loras); more wait in queue."
    )
    max_cpu_loras: int = Field(
        32, ge=1, le=4096,
        description="Adapters registered in each engine (host memory, vLLM --max-cpu-loras); Governor evicts the "
        "least recently used idle one to make room. Raised to MAX_LORAS if lower.",
    )  # fmt: skip
    adapter_wait_seconds: float = Field(
        60.0, gt=0,
        description="Longest a request waits for room in the engine for its adapter (503 adapter_wait_timeout past "
        "it); the request's deadline bounds it too.",
    )  # fmt: skip
    object_cache_bytes: int = Field(
        8 * 1024**3, ge=1024 * 1024,
        description="Disk bound for adapters fetched from an object store (s3://, file://); LRU beyond.",
    )  # fmt: skip
    max_lora_rank: int = Field(
        16,
        ge=1,
        le=512,
        description="Largest LoRA rank accepted (higher costs throughput: 64 runs ~40% slower on CPU).",
    )
    max_adapter_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest adapter weights file accepted.")
    staging_dir: Path | None = Field(
        None,
        description="Where validated adapter copies are staged for the engine; default: STATE_DIR/staged. "
        "With ENGINE_URL it must be set to a directory the engine reads too, else adapters are refused.",
    )
    engine_staging_dir: str = Field(
        "", description="STAGING_DIR's path as a remote engine sees it, if mounted elsewhere; empty = the same."
    )
    require_adapter_base_name: bool = Field(
        False, description="Refuse adapters whose config names no base model (default: load them with a warning)."
    )

    # Requests
    request_timeout: float = Field(600.0, gt=0, description="Deadline per request in seconds (504 past it).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body (413 past it).")
    max_tokens_limit: int = Field(8192, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_messages: int = Field(1024, ge=1, description="Most messages in one chat request.")
    max_stop: int = Field(16, ge=0, description="Most stop strings in one request (after template stops).")
    max_logprobs: int = Field(20, ge=0, description="Largest logprobs/top_logprobs.")
    max_running: int = Field(256, ge=1, description="Requests in flight per engine before queueing.")
    max_queued: int = Field(1024, ge=0, description="Requests waiting per engine before 429.")
    allow_engine_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Engine-side request fields clients may send (e.g. chat_template)."
    )
    allow_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Request fields Governor does not know (or refuses) that clients may send anyway, unchecked.",
    )
    max_request_sequences: int = Field(
        256, ge=1, description="Most sequences (prompts x n, or x best_of) one request may ask for (400 past it)."
    )
    address_concurrency: int = Field(
        64, ge=0, description="Concurrent requests per client address when no API key is shown (0 = unlimited)."
    )
    cache_salt_per_key: bool = Field(
        True,
        description="With API keys set, salt the engine's prefix cache per key (a hash of it): one key's requests "
        "cannot time another's cached prefixes; prefixes are not shared across keys.",
    )
    docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json.")
    ui: bool = Field(
        True, description="Serve the web page at /ui (status, playground, eval); its calls need a /v1 key."
    )

    # Auth
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="User keys for /v1 (comma-separated); empty = open."
    )
    api_keys_file: Path | None = Field(
        None, description="A file holding the user keys (one a line or comma-separated), instead of API_KEYS."
    )
    admin_key: str = Field("", description="Key for /admin; empty = admin API off.")
    admin_key_file: Path | None = Field(None, description="A file holding ADMIN_KEY (instead of it).")
    metrics_auth: bool = Field(False, description="Require a user or admin key on /metrics.")
    key_rpm: int = Field(0, ge=0, description="Requests per minute per API key (0 = unlimited).")
    key_tpm: int = Field(0, ge=0, description="Prompt + output tokens per minute per API key (0 = unlimited).")
    key_concurrency: int = Field(0, ge=0, description="Concurrent requests per API key (0 = unlimited).")

    # Decoding policy
    default_preset: str = Field("balanced", description="Decoding preset used when a request names none.")
    presets_file: Path | None = Field(None, description="JSON file with user-defined presets.")
    ready_cache_seconds: float = Field(2.0, ge=0, description="How long /ready reuses its generation probe.")
    keep_alive_seconds: int = Field(
        75, ge=1,
        description="How long an idle client connection stays open; longer than clients and proxies keep theirs "
        "(aiohttp 15 s, nginx and cloud load balancers 60 s), so they close first and never reuse a closed one.",
    )  # fmt: skip
    drain_seconds: float = Field(5.0, ge=0, description="On SIGTERM: seconds /ready is 503 before the listener closes.")

    @field_validator("engine_url", "api_keys", "allow_engine_fields", "allow_fields", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @model_validator(mode="after")
    def _secret_files(self) -> Settings:
        """Each secret from its file when one is named (a mounted Secret, a 0600 file), read once at start."""
        for name in SECRETS:
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            env = f"GOVERNOR_{name.upper()}"
            if getattr(self, name):
                raise ValueError(f"{env} and {env}_FILE are both set; set one of them.")
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"{env}_FILE: cannot read {path}: {exc.strerror or exc}") from exc
            value = _split_list(text.replace("\n", ",")) if name == "api_keys" else text.strip()
            if not value:
                raise ValueError(f"{env}_FILE: {path} is empty.")
            setattr(self, name, value)
        return self

    @property
    def engine_adapter_slots(self) -> int:
        """Adapters each engine keeps registered: MAX_CPU_LORAS, never fewer than the batch's MAX_LORAS."""
        return max(self.max_cpu_loras, self.max_loras)

    @property
    def resolved_state_dir(self) -> Path:
        """Directory for the adapter registry's persisted state."""
        return self.state_dir or self.cache_dir / "state"
