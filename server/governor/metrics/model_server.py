"""The model-server series an inference endpoint picker reads (the llm-d / Gateway API Inference Extension
EPP, vLLM engine type): queue, running, KV cache, cache config and LoRA use, one series per pod.

The EPP scrapes every ~50 ms and takes, per family, the first series matching its spec (or, for
`vllm:lora_requests_info`, the one with the highest value: a timestamp). So each family here has exactly
one series, for the whole Governor: with several engines the pod's sums (and a blocks-weighted KV use),
labelled `engine="all"`. The queue and LoRA series come from Governor's own request state (O(adapters)
per scrape, no engine round trip); the KV-cache and cache-config series from the engines' recent /metrics
copies (parsed once per refresh, not per scrape). The engine's own families of these names are not
re-exported beside them (a family appears once in an exposition, and a second `lora_requests_info`
would name `name@2` versions that clients cannot ask for): its running, waiting and KV-cache series
stay, per engine, as `governor_engine_*` (RENAMED); its cache_config_info and lora_requests_info go.

vLLM fills `running_lora_adapters` and `waiting_lora_adapters` from the same scheduler dict; here
waiting means admitted with no first token yet and running means generating, counted per public
adapter name. Loaded-but-idle adapters, invisible in vLLM's series, are `governor_adapter_loaded`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.utils import floatToGoString

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"
LORA_INFO = "vllm:lora_requests_info"
LOADED = "governor_adapter_loaded"
TIERS = {True: "engine", False: "registry"}  # where a registered adapter lives: registered in the engines, or known
# The engine families these replace in the re-export.
REPLACED = frozenset({RUNNING, WAITING, KV_USAGE, CACHE_CONFIG, LORA_INFO})
# The engine's own scheduler view stays visible per engine under Governor's names (what vLLM itself
# is running: tests and operators read it to see aborts reach the engine); its lora_requests_info goes.
RENAMED = {
    RUNNING: "governor_engine_num_requests_running",
    WAITING: "governor_engine_num_requests_waiting",
    KV_USAGE: "governor_engine_kv_cache_usage_perc",
}
ALL_ENGINES = "all"

_LABEL = re.compile(r'([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"')


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class Flight:
    """One request admitted to an engine: waiting until its first token, then running, until it ends."""

    __slots__ = ("_counts", "_flights", "_state")

    def __init__(self, flights: Flights, counts: list[int] | None) -> None:
        self._flights = flights
        self._counts = counts  # [waiting, running] of its adapter, or None for the base model
        self._state = 0  # 0 waiting, 1 running, 2 ended

    def started(self) -> None:
        """The first token arrived (called once per response; later calls do nothing)."""
        if self._state != 0:
            return
        self._state = 1
        f, c = self._flights, self._counts
        f.waiting -= 1
        f.running += 1
        if c is not None:
            c[0] -= 1
            c[1] += 1

    def end(self) -> None:
        """The request is over, however it ended (idempotent)."""
        state = self._state
        if state == 2:
            return
        self._state = 2
        f, c = self._flights, self._counts
        if state == 0:
            f.waiting -= 1
        else:
            f.running -= 1
        if c is not None:
            c[state] -= 1


class Flights:
    """Requests in flight by state, in total and per public adapter name. Event-loop only, no locks."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.adapters: dict[str, list[int]] = {}  # public name → [waiting, running]; kept at zero once seen

    def admit(self, adapter: str | None) -> Flight:
        """A request (for `adapter`, or the base model when None) goes to an engine."""
        counts = None
        if adapter is not None:
            counts = self.adapters.get(adapter)
            if counts is None:
                counts = self.adapters[adapter] = [0, 0]
            counts[0] += 1
        self.waiting += 1
        return Flight(self, counts)

    def lora_sets(self) -> tuple[list[str], list[str]]:
        """(running, waiting) adapter names, sorted; an adapter with both kinds of request is in both."""
        running, waiting = [], []
        for name, (w, r) in sorted(self.adapters.items()):
            if r:
                running.append(name)
            if w:
                waiting.append(name)
        return running, waiting

    def forget(self, known: set[str]) -> None:
        """Drop idle entries of adapters no longer registered (keeps the dict bounded)."""
        for name in [n for n, c in self.adapters.items() if n not in known and c == [0, 0]]:
            del self.adapters[name]


@dataclass
class EngineCache:
    """What one engine's /metrics says about its KV cache: use (0-1) and its cache_config_info labels."""

    usage: float | None = None
    config: dict[str, str] | None = None

    @property
    def blocks(self) -> float:
        try:
            return float((self.config or {}).get("num_gpu_blocks", ""))
        except ValueError:
            return 0.0

    @classmethod
    def parse(cls, text: str) -> EngineCache:
        """From vLLM's exposition text; several data-parallel series are averaged (usage) and summed (blocks)."""
        usages: list[float] = []
        config: dict[str, str] | None = None
        blocks = 0.0
        for line in text.split("\n"):
            if line.startswith(KV_USAGE) and line[len(KV_USAGE) : len(KV_USAGE) + 1] in ("{", " "):
                try:
                    usages.append(float(line.rsplit(" ", 1)[1]))
                except (IndexError, ValueError):
                    continue
            elif line.startswith(CACHE_CONFIG + "{"):
                labels = dict(_LABEL.findall(line[len(CACHE_CONFIG) : line.rfind("}") + 1]))
                labels.pop("engine", None)  # vLLM's data-parallel index; Governor's engine label replaces it
                try:
                    blocks += float(labels.get("num_gpu_blocks", ""))
                except ValueError:
                    pass
                if config is None:
                    config = labels
        if config is not None and blocks:
            config["num_gpu_blocks"] = str(int(blocks))
        return cls(sum(usages) / len(usages) if usages else None, config)


class ModelServerSeries:
    """Renders the picker-facing families for one Governor from its request state and engine copies."""

    def __init__(
        self,
        flights: Flights,
        served_model: Callable[[], str],
        max_loras: int | None,
        adapters: Callable[[], Iterable[tuple[str, bool, bool]]] = lambda: (),
        loading: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """`max_loras`: the engine's adapter slots, None when LoRA is off (no lora_requests_info then);
        `adapters`: (public name, loaded on the engines, pinned) per registered adapter; `loading`: requests
        per adapter waiting for it to be loaded into the engines (queued here, so waiting for the picker)."""
        self.flights = flights
        self.served_model = served_model
        self.max_loras = max_loras
        self.adapters = adapters
        self.loading = loading

    def render(self, engines: Sequence[str], caches: Sequence[EngineCache | None]) -> str:
        """`engines`: every engine's name; `caches`: the parsed copies of those that answered."""
        engine = engines[0] if len(engines) == 1 else ALL_ENGINES
        common = _labels((("engine", engine), ("model_name", self.served_model())))
        f = self.flights
        loading = self.loading()
        out = [
            f"# HELP {WAITING} Requests with no token yet: admitted to the engines or waiting for their adapter to "
            f"load (Governor's count, all engines).\n"
            f"# TYPE {WAITING} gauge\n{WAITING}{common} {float(f.waiting + sum(loading.values()))!r}\n",
            f"# HELP {RUNNING} Requests generating (first token seen; Governor's count, all engines).\n"
            f"# TYPE {RUNNING} gauge\n{RUNNING}{common} {float(f.running)!r}\n",
        ]
        copies = [c for c in caches if c is not None]
        usage = [(c.usage, c.blocks or 1.0) for c in copies if c.usage is not None]
        if usage:
            value = sum(u * w for u, w in usage) / sum(w for _, w in usage)
            out.append(f"# HELP {KV_USAGE} KV-cache usage, 1 means 100 percent (blocks-weighted over engines).\n"
                       f"# TYPE {KV_USAGE} gauge\n{KV_USAGE}{common} {value!r}\n")  # fmt: skip
        configs = [c.config for c in copies if c.config is not None]
        if configs:
            config = dict(configs[0])
            if len(configs) > 1:
                config["num_gpu_blocks"] = str(int(sum(c.blocks for c in copies if c.config is not None)))
            config["engine"] = engine
            labels = _labels(sorted(config.items()))
            out.append(f"# HELP {CACHE_CONFIG} Information of the engines' CacheConfig (blocks summed over engines).\n"
                       f"# TYPE {CACHE_CONFIG} gauge\n{CACHE_CONFIG}{labels} 1.0\n")  # fmt: skip
        if self.max_loras is not None:
            running, waiting = f.lora_sets()
            if loading:
                waiting = sorted({*waiting, *loading})
            labels = _labels((("max_lora", str(self.max_loras)), ("running_lora_adapters", ",".join(running)),
                              ("waiting_lora_adapters", ",".join(waiting))))  # fmt: skip
            out.append(f"# HELP {LORA_INFO} Adapters by public name with requests generating (running) or admitted "
                       f"without a token yet (waiting); max_lora = engine slots; value = time of this scrape.\n"
                       f"# TYPE {LORA_INFO} gauge\n{LORA_INFO}{labels} {floatToGoString(time.time())}\n")  # fmt: skip
        registered = sorted(self.adapters())
        if len(f.adapters) > len(registered):
            f.forget({name for name, _, _ in registered})
        loaded = [f'{LOADED}{{adapter="{name}",pinned="{str(pinned).lower()}",tier="{TIERS[up]}"}} '
                  f"{1.0 if up else 0.0}\n" for name, up, pinned in registered]  # fmt: skip
        out.append(f"# HELP {LOADED} 1 when the adapter is loaded on the engines (idle or not; tier engine), 0 when "
                   f"registered but evicted or not loaded yet (tier registry).\n# TYPE {LOADED} gauge\n")  # fmt: skip
        out.extend(loaded)
        return "".join(out)
