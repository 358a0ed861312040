"""Reads every GPU through NVML, one GPU independently of the others; errors are classified, never raised.

Runs on the GPU collector's background thread only (see metrics/gpu.py): NVML calls can hang in the
driver, so nothing here is ever called from the event loop.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("governor.metrics.gpu")

INIT_RETRY_S = 60.0
"""A first NVML init that fails is retried at most this often (a missing driver rarely appears later)."""

REINIT_BACKOFF_S = (1.0, 60.0)
"""After a fault that needs it, NVML is re-initialised after the first delay, doubling up to the second."""

# NVML return codes (part of the NVML ABI, the same in every driver and pynvml) -> the `error` label.
# pynvml raises NVMLError_<CamelCase> subclasses built from these names; the label is their snake case.
ERROR_NAMES: dict[int, str] = {
    1: "uninitialized", 2: "invalid_argument", 3: "not_supported", 4: "no_permission",
    5: "already_initialized", 6: "not_found", 7: "insufficient_size", 8: "insufficient_power",
    9: "driver_not_loaded", 10: "timeout", 11: "irq_issue", 12: "library_not_found",
    13: "function_not_found", 14: "corrupted_inforom", 15: "gpu_is_lost", 16: "reset_required",
    17: "operating_system", 18: "lib_rm_version_mismatch", 19: "in_use", 20: "memory", 21: "no_data",
    22: "vgpu_ecc_not_supported", 23: "insufficient_resources", 24: "freq_not_supported",
    25: "argument_version_mismatch", 26: "deprecated", 27: "not_ready", 28: "gpu_not_found",
    29: "invalid_state", 30: "reset_type_not_supported", 999: "unknown",
}  # fmt: skip
OTHER_ERROR = "other"  # not an NVMLError, or a code newer than this table
HUNG_ERROR = "hung"  # a call that has not returned within the collector's staleness bound
READER_ERROR = "reader_failed"  # a whole round raised (a bug, a broken binding): every GPU down for it

# Errors that concern one field of a working GPU (the field is skipped, the rest of the reading is kept).
# `other` is here too: a TypeError or a struct without the expected attribute is a binding that does not
# match this field (pynvml/driver versions), not a GPU fault; treating it as one hid every value.
# Anything else marks the GPU down for that reading and skips its remaining calls.
FIELD_ERRORS = frozenset({
    "not_supported", "no_permission", "invalid_argument", "function_not_found", "not_found", "no_data",
    "insufficient_size", "argument_version_mismatch", "deprecated", OTHER_ERROR,
})  # fmt: skip
# Errors that handles obtained before them will not recover from: NVML is shut down and initialised again.
REINIT_ERRORS = frozenset({"gpu_is_lost", "uninitialized", "driver_not_loaded"})

# Clocks-event ("throttle") reason bits. They are part of the NVML ABI and identical across
# drivers and pynvml versions; listing them here keeps the `reason` label a fixed, bounded set.
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", 0x1),
    ("applications_clocks", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal", 0x20),
    ("hw_thermal", 0x40),
    ("hw_power_brake", 0x80),
    ("display_clocks", 0x100),
)

# family key, NVML function, extra args after the handle, factor to the metric's base unit.
# Args are NVML enum values (ABI-stable): NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2.
SCALAR_FIELDS: tuple[tuple[str, str, tuple[int, ...], float], ...] = (
    ("temperature", "nvmlDeviceGetTemperature", (0,), 1.0),
    ("power", "nvmlDeviceGetPowerUsage", (), 1e-3),  # mW
    ("power_limit", "nvmlDeviceGetEnforcedPowerLimit", (), 1e-3),  # mW
    ("energy", "nvmlDeviceGetTotalEnergyConsumption", (), 1e-3),  # mJ
    ("clock_sm", "nvmlDeviceGetClockInfo", (1,), 1e6),  # MHz
    ("clock_memory", "nvmlDeviceGetClockInfo", (2,), 1e6),  # MHz
)


@dataclass(frozen=True)
class GpuId:
    """A GPU as labelled in every per-GPU series; name and uuid are empty until NVML has named it."""

    index: int
    name: str = ""
    uuid: str = ""

    @property
    def labels(self) -> list[str]:
        return [str(self.index), self.name, self.uuid]


@dataclass(frozen=True)
class GpuReading:
    """One GPU's values from one round; `up` is False when the GPU could not be read."""

    gpu: GpuId
    at: float
    up: bool
    values: dict[str, float] = field(default_factory=dict)  # family key -> value in base units
    throttle: int | None = None  # clocks-event reason bit mask
    error: str = ""  # why it is down


@dataclass(frozen=True)
class Round:
    """Everything one pass over the GPUs found."""

    at: float
    nvml_ok: bool  # NVML initialised and listed its GPUs
    readings: list[GpuReading]
    errors: list[tuple[str, str]]  # (gpu, error) per failed call


class _GpuFailed(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def _utilization(util: Any) -> dict[str, float]:
    return {"utilization": util.gpu / 100.0, "memory_utilization": util.memory / 100.0}


def _memory(mem: Any) -> dict[str, float]:
    return {"memory_used": float(mem.used), "memory_total": float(mem.total)}


def _text(value: str | bytes) -> str:
    # pynvml < 11.5 returns bytes for names and UUIDs.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlReader:
    """NVML init/re-init and per-GPU reads; one thread at a time. `nvml` replaces `pynvml` (tests).

    `busy(gpu)` is called before the calls for one GPU (None: NVML-level calls) and `busy(None, done=True)`
    when a round ends, so the collector can tell a hung call from a slow one without waiting on it.
    """

    def __init__(
        self,
        nvml: Any,
        clock: Callable[[], float],
        busy: Callable[[int | None, bool], None],
        *,
        init_retry: float = INIT_RETRY_S,
        reinit_backoff: tuple[float, float] = REINIT_BACKOFF_S,
    ) -> None:
        self._nvml = nvml
        self._clock = clock
        self._busy = busy
        self._init_retry = init_retry
        self._backoff_min, self._backoff_max = reinit_backoff
        self._delay = self._backoff_min
        self._open = False
        self._ever_opened = False
        self._count = 0
        self._next_init_at: float | None = None
        self._reinit_at: float | None = None
        self._handles: dict[int, tuple[GpuId, Any]] = {}  # this NVML session's identified GPUs
        self._known: dict[int, GpuId] = {}  # every GPU ever listed: its series stay (down) when it goes
        self._up: dict[int, bool] = {}
        self._logged: set[tuple[str, ...]] = set()
        self._scalars: list[tuple[str, Callable[..., Any], tuple[int, ...], float]] = []
        self._throttle_fn: Callable[..., Any] | None = None

    def read(self) -> Round:
        """One pass: (re-)initialise NVML when due, then read each GPU on its own."""
        now = self._clock()
        errors: list[tuple[str, str]] = []
        if self._open and self._reinit_at is not None and now >= self._reinit_at:
            logger.info("NVML re-initialising after a fault delay_s=%.0f", self._delay)
            self.shutdown()
        if not self._open and not self._try_open(now):
            readings = [self._down(gpu, now, "nvml_unavailable") for gpu in self._known.values()]
            self._busy(None, True)
            return Round(now, False, readings, errors)
        readings = []
        reinit = False
        for index in sorted(set(range(self._count)) | set(self._known)):
            self._busy(index, False)
            if index >= self._count:  # listed before a re-init, gone since: keep it visible as down
                readings.append(self._down(self._known[index], now, "missing"))
                reinit = True
                continue
            reading = self._read_gpu(index, now, errors)
            reinit = reinit or reading.error in REINIT_ERRORS
            readings.append(reading)
        self._busy(None, True)
        if not reinit:
            self._delay = self._backoff_min
        elif self._reinit_at is None:
            self._reinit_at = now + self._delay
            self._delay = min(self._delay * 2, self._backoff_max)
        return Round(now, True, readings, errors)

    def shutdown(self) -> None:
        """Release NVML (its handles die with it); the next round initialises it again."""
        self._handles.clear()
        self._reinit_at = None
        if not self._open:
            return
        self._open = False
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            self.log_once(("shutdown", str(exc)), logging.DEBUG, "NVML shutdown failed error=%s", exc)

    def _try_open(self, now: float) -> bool:
        if self._next_init_at is not None and now < self._next_init_at:
            return False
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                self._next_init_at = now + self._init_retry
                self.log_once(("import",), logging.INFO, "GPU metrics disabled: pynvml not importable error=%s", exc)
                return False
        nvml = self._nvml
        self._busy(None, False)
        try:
            nvml.nvmlInit()
        except Exception as exc:  # any init failure must leave /metrics working, not just NVMLError
            return self._open_failed(now, "init", exc)
        self._open = True
        try:
            self._count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.shutdown()
            return self._open_failed(now, "count", exc)
        self._next_init_at = None
        self._scalars = [
            (key, function, args, factor)
            for key, name, args, factor in SCALAR_FIELDS
            if (function := getattr(nvml, name, None)) is not None
        ]
        # The reasons call was renamed in NVML 12.2; older pynvml only has the throttle spelling.
        self._throttle_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        if not self._ever_opened:
            logger.info("GPU metrics enabled: gpus=%d", self._count)
        self._ever_opened = True
        return True

    def _open_failed(self, now: float, step: str, exc: Exception) -> bool:
        # Never opened: probably no driver at all, retry rarely. Opened before: a fault, retry with backoff.
        retry = self._delay if self._ever_opened else self._init_retry
        if self._ever_opened:
            self._delay = min(self._delay * 2, self._backoff_max)
        self._next_init_at = now + retry
        level = logging.WARNING if self._ever_opened else logging.INFO
        self.log_once(
            (step, str(exc)), level, "GPU metrics unavailable: NVML %s failed error=%s retry_s=%.0f", step, exc, retry
        )
        return False

    def _read_gpu(self, index: int, now: float, errors: list[tuple[str, str]]) -> GpuReading:
        """Identify (once per NVML session) and read one GPU; a failure here touches no other GPU."""
        nvml = self._nvml
        try:
            if index in self._handles:
                gpu, handle = self._handles[index]
            else:
                handle = self._call(index, "handle", errors, None, None, nvml.nvmlDeviceGetHandleByIndex, index)
                name = self._call(index, "name", errors, None, _text, nvml.nvmlDeviceGetName, handle)
                uuid = self._call(index, "uuid", errors, None, _text, nvml.nvmlDeviceGetUUID, handle)
                gpu = GpuId(index, name, uuid)
                self._handles[index] = (gpu, handle)
                self._known[index] = gpu
            values: dict[str, float] = {}
            skipped: list[str] = []
            # Each field is called and converted under one guard, so a field that fails in any way
            # costs only its own samples.
            for what, convert, function in (
                ("utilization", _utilization, nvml.nvmlDeviceGetUtilizationRates),
                ("memory", _memory, nvml.nvmlDeviceGetMemoryInfo),
            ):
                values.update(self._call(index, what, errors, skipped, convert, function, handle) or {})
            for key, function, args, factor in self._scalars:
                raw = self._call(index, key, errors, skipped, float, function, handle, *args)
                if raw is not None:
                    values[key] = raw * factor
            mask = None
            if self._throttle_fn is not None:
                mask = self._call(index, "throttle", errors, skipped, int, self._throttle_fn, handle)
        except _GpuFailed as failed:
            if failed.error in REINIT_ERRORS:
                self._handles.pop(index, None)
            return self._down(self._known.get(index, GpuId(index)), now, failed.error)
        faults = [error for error in skipped if error != "not_supported"]
        if not values and mask is None and faults:  # every field failed: calling this GPU up would hide it
            return self._down(gpu, now, faults[-1])
        self._mark(index, True, "")
        return GpuReading(gpu, now, True, values, mask)

    def _call(
        self,
        index: int,
        what: str,
        errors: list[tuple[str, str]],
        skipped: list[str] | None,
        convert: Callable[[Any], Any] | None,
        function: Any,
        *args: Any,
    ) -> Any:
        """`convert(function(*args))`; None when the field is unavailable (its error goes to `skipped`),
        `_GpuFailed` when the GPU is. `skipped` None: an identity call (handle, name, uuid), never field-only."""
        try:
            raw = function(*args)
            return raw if convert is None else convert(raw)
        except Exception as exc:
            error = self.error_name(exc)
            if error != "not_supported":
                errors.append((str(index), error))
            if error not in FIELD_ERRORS or skipped is None:
                raise _GpuFailed(error) from exc
            skipped.append(error)
            # NotSupported is a property of the GPU model (said once, at INFO so it shows in a serve log),
            # not a fault; anything else is counted in governor_gpu_errors_total and warned about once.
            level = logging.INFO if error == "not_supported" else logging.WARNING
            self.log_once(("field", what, error), level, "GPU metric skipped: field=%s gpu=%d error=%s (%r)",
                           what, index, error, exc)  # fmt: skip
            return None

    def failed_round(self, error: str = READER_ERROR) -> Round:
        """The round published when `read()` itself raised: every known GPU down, the failure counted."""
        now = self._clock()
        self._busy(None, True)  # the raise may have left a GPU marked busy: it is not hung
        gpus = list(self._known.values())
        readings = [self._down(gpu, now, error) for gpu in gpus]
        return Round(now, False, readings, [(str(gpu.index), error) for gpu in gpus] or [("", error)])

    def error_name(self, exc: BaseException) -> str:
        """The bounded `error` label for an exception from an NVML call."""
        nvml_error = getattr(self._nvml, "NVMLError", None)
        value = getattr(exc, "value", None)
        if nvml_error is not None and isinstance(exc, nvml_error) and isinstance(value, int):
            return ERROR_NAMES.get(value, OTHER_ERROR)
        return OTHER_ERROR

    def _down(self, gpu: GpuId, now: float, error: str) -> GpuReading:
        self._mark(gpu.index, False, error)
        return GpuReading(gpu, now, False, error=error)

    def _mark(self, index: int, up: bool, error: str) -> None:
        # Transitions only: a GPU that stays lost logs once, and once more when it comes back.
        if self._up.get(index) == up:
            return
        if up:
            if index in self._up:
                logger.info("GPU up again gpu=%d", index)
        else:
            logger.warning("GPU down gpu=%d error=%s", index, error)
        self._up[index] = up

    def log_once(self, kind: tuple[str, ...], level: int, msg: str, *args: Any, trace: bool = False) -> None:
        """Log `msg` the first time `kind` is seen (with the current traceback if `trace`)."""
        if kind not in self._logged:
            self._logged.add(kind)
            logger.log(level, msg, *args, exc_info=trace)
