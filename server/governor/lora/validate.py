"""Adapter validation, before an engine sees anything: name, path containment, file types, size, rank,
base model and target modules. Every refusal is a typed error whose message says what to fix.

No file outside the adapters root is ever opened: the folder is resolved (symlinks followed, which reads
links but opens nothing) and checked to lie inside the root first; its files are then copied into a staged
directory Governor owns (staging.py: no symlink followed, regular files only) and every check runs on that
copy, the one the engine is given. Pickle weights are refused, never unpickled or copied; the safetensors
header is parsed by the safetensors library, which runs no code. Adapter-supplied regexes run on RE2
(linear time), never on Python's backtracking `re`; every field of adapter_config.json is checked by
peft_config.py, patterns included, and fields it does not know are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from safetensors import SafetensorError, safe_open

from governor.errors import AdapterNotFound, GovernorError, InvalidRequest
from governor.lora.base_model import BaseModelInfo, last_component, layer_index
from governor.lora.peft_config import CONFIG, check_fields, compile_pattern
from governor.lora.staging import AdapterStager, Member

log = logging.getLogger("governor.lora")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WEIGHTS = "adapter_model.safetensors"
PROFILE = "governor.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CONFIG_LIMIT = 1024 * 1024
PROFILE_LIMIT = 64 * 1024
# PEFT configs nest 3 deep, profiles a few more; json.loads recurses per level and raises RecursionError near 1,000.
JSON_DEPTH = 32
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)  # a string (skipped) or a bracket
_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.(?:weight|bias)$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter folder that passed every check: what the registry loads and serves."""

    name: str
    folder: Path  # the user's folder, resolved, inside the root: never given to the engine
    staged: Path  # Governor's read-only copy, the one checked and loaded
    size: int  # bytes of adapter_model.safetensors
    rank: int
    fingerprint: str  # sha256 of the staged files: a new value is a new engine version
    profile: dict[str, Any] | None


def check_name(name: str, served_model: str = "") -> None:
    """An adapter name is a model name clients send: a short safe token, distinct from the base model."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            f"Invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter "
            "or digit, without '..'.",
            param="name",
        )
    if served_model and name.casefold() == served_model.casefold():
        raise InvalidRequest(
            f"Adapter name '{name}' is the base model's served name; choose another name.", param="name"
        )


def is_temporary(name: str) -> bool:
    """Hidden, editor and partial-download names the watcher and scans skip."""
    return name.startswith((".", "~", "#")) or name.endswith(("~", ".tmp", ".part", ".partial", ".swp", ".crdownload"))


def inside(root: Path, path: Path) -> Path | None:
    """`path` resolved (symlinks followed) if it lies strictly inside `root`, else None. Opens nothing."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # symlink loops
        return None
    return resolved if resolved != root and resolved.is_relative_to(root) else None


def resolve_folder(root: Path, path: str) -> Path:
    """The adapter folder for `path` (relative to root, or absolute inside it), resolved inside root."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise InvalidRequest("Adapter 'path' must be a folder name under the adapters root.", param="path")
    pure = PurePath(path)
    if ".." in pure.parts:
        raise InvalidRequest(
            f"Adapter path {path!r} contains '..'; give a folder inside the adapters root ({root}).", param="path"
        )
    candidate = Path(path) if pure.is_absolute() else root / pure
    # Refuse an absolute path outside the root before touching anything there.
    if pure.is_absolute() and not Path(os.path.normpath(candidate)).is_relative_to(root):
        raise InvalidRequest(
            f"Adapter path {path!r} is outside the adapters root ({root}); move the folder there.", param="path"
        )
    resolved = inside(root, candidate)
    if resolved is None and Path(os.path.normpath(candidate)) == root:
        raise InvalidRequest(
            f"Adapter path {path!r} is the adapters root itself; name a folder inside it.", param="path"
        )
    if resolved is None:
        raise InvalidRequest(
            f"Adapter path {path!r} resolves outside the adapters root ({root}), e.g. through a symlink; "
            "copy the folder into the root instead.",
            param="path",
        )
    if not resolved.exists():
        raise AdapterNotFound(f"Adapter folder {path!r} does not exist under the adapters root ({root}).", param="path")
    if not resolved.is_dir():
        raise InvalidRequest(f"Adapter path {path!r} is not a folder; give the PEFT adapter folder.", param="path")
    return resolved


def _json_object(data: bytes, what: str, param: str) -> dict[str, Any]:
    nested = InvalidRequest(f"{what} is nested more than {JSON_DEPTH} levels deep; fix the file.", param=param)
    if _too_deep(data):
        raise nested
    try:
        value = json.loads(data)
    except RecursionError as exc:  # cannot happen after _too_deep; kept so a parser change cannot wedge a load
        raise nested from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{what} is not valid JSON ({exc}); fix the file.", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object.", param=param)
    return value


def _too_deep(data: bytes) -> bool:
    """Whether brackets outside strings nest past JSON_DEPTH: one linear scan, stopping at the first excess."""
    depth = 0
    for token in _JSON_TOKEN.finditer(data):
        char = data[token.start()]
        if char in b"[{":
            depth += 1
            if depth > JSON_DEPTH:
                return True
        elif char in b"]}":
            depth -= 1
    return False


class AdapterValidator:
    """Checks PEFT folders under one root against one base model and the server's limits."""

    def __init__(
        self,
        root: Path,
        base: BaseModelInfo,
        max_rank: int,
        max_bytes: int,
        stager: AdapterStager,
        require_base_name: bool = False,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.stager = stager
        self.require_base_name = require_base_name
        self.members = (
            Member(CONFIG, CONFIG_LIMIT, required=True),
            Member(WEIGHTS, max_bytes, required=True),
            Member(PROFILE, PROFILE_LIMIT, required=False, param="profile"),
        )

    def validate(self, name: str, path: str, served_model: str = "", root: Path | None = None) -> ValidatedAdapter:
        """Every check, in order of cost; raises the first refusal. On success the caller holds one reference
        to the staged copy (stager.release(fingerprint) when done with it). `root`: another root than the
        adapters root (the object-store cache a fetched adapter lies in)."""
        check_name(name, served_model or self.base.served_name)
        root = root or self.root
        folder = resolve_folder(root, path)
        try:
            self._refuse_pickles(folder, path)
            staged = self.stager.stage(root, folder, self.members, path)
        except OSError as exc:  # the folder vanished or is unreadable, or the staging directory is
            raise InvalidRequest(f"Adapter folder {path!r} could not be read and staged: {exc}.", param="path") from exc
        try:
            config = _json_object((staged.path / CONFIG).read_bytes(), CONFIG, "path")
            rank = self._check_config(config, served_model, name)
            self._check_tensors(staged.path / WEIGHTS)
            profile = None
            if PROFILE in staged.sizes:
                profile = _json_object((staged.path / PROFILE).read_bytes(), PROFILE, "profile")
        except BaseException:
            self.stager.release(staged.digest)
            raise
        return ValidatedAdapter(name, folder, staged.path, staged.sizes[WEIGHTS], rank, staged.digest, profile)

    # -- files -------------------------------------------------------------------------------------

    def _refuse_pickles(self, folder: Path, path: str) -> None:
        # They are never copied, so the engine could not fall back to them; refused anyway so a folder
        # that holds one is fixed rather than served from its other files by surprise.
        with os.scandir(folder) as entries:
            pickles = sorted(e.name for e in entries if e.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise InvalidRequest(
                f"Adapter folder {path!r} contains pickle weights ({', '.join(pickles[:3])}); pickles can run code "
                f"and are never loaded. Save with safetensors ({WEIGHTS}) and remove them.",
                param="path",
            )

    # -- adapter_config.json -----------------------------------------------------------------------

    def _check_config(self, config: dict[str, Any], served_model: str, name: str) -> int:
        peft_type = config.get("peft_type")
        if peft_type is not None and str(peft_type).upper() != "LORA":
            raise InvalidRequest(f"Only LoRA adapters are served; this one is {peft_type}.", param="peft_type")
        check_fields(config)  # every field known, patterns safe, no feature the engine would refuse
        rank = self._rank(config.get("r"), "r")
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, dict):
            raise InvalidRequest(f"{CONFIG}: 'rank_pattern' must be an object.", param="rank")
        for key, value in pattern.items():
            rank = max(rank, self._rank(value, f"rank_pattern[{key!r}]"))
        self._check_base_name(config.get("base_model_name_or_path"), served_model, name)
        self._check_target_modules(config.get("target_modules"))
        return rank

    def _rank(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"{CONFIG}: {where} must be a positive integer, got {value!r}.", param="rank")
        if value > self.max_rank:
            raise InvalidRequest(
                f"Adapter rank {where}={value} exceeds the server's max LoRA rank {self.max_rank}; retrain with a "
                f"rank ≤ {self.max_rank} or raise GOVERNOR_MAX_LORA_RANK.",
                param="rank",
            )
        return value

    def _check_base_name(self, declared: Any, served_model: str, name: str) -> None:
        if not isinstance(declared, str) or not declared.strip():
            # Adapters saved from a model built in memory or converted by other tools often lack the name, and
            # with a local base the tensor shapes are the stronger check; so by default this only warns.
            if self.require_base_name:
                raise InvalidRequest(
                    f"{CONFIG} does not name its base model (base_model_name_or_path); add it, or set "
                    "GOVERNOR_REQUIRE_ADAPTER_BASE_NAME=false to accept adapters without it.",
                    param="base_model",
                )
            log.warning(
                "adapter '%s' does not name its base model; %s", name,
                "its tensor shapes are checked against the base" if self.base.known
                else "nothing checks that it was trained on this base",
            )  # fmt: skip
            return
        names = self.base.names() | ({last_component(served_model)} if served_model else set())
        if names and last_component(declared) not in names:
            served = served_model or self.base.served_name
            raise InvalidRequest(
                f"Adapter was trained on '{declared}', but this server serves '{served}'; load it on a server "
                "with that base model, or fix base_model_name_or_path if the bases are the same.",
                param="base_model",
            )

    def _check_target_modules(self, targets: Any) -> None:
        if targets is None or targets == "all-linear":
            return
        modules = self.base.shapes.keys()
        if isinstance(targets, str):
            pattern = compile_pattern(targets)
            if self.base.known and not any(pattern.fullmatch(m) for m in modules):
                raise InvalidRequest(
                    f"target_modules regex {targets!r} matches no module of the base model "
                    f"(modules: {', '.join(sorted(self.base.modules))}).",
                    param="target_modules",
                )
            return
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise InvalidRequest("target_modules must be a list of module names or a regex.", param="target_modules")
        if not self.base.known:
            return
        unknown = [t for t in targets if t not in self.base.modules and not any(m.endswith("." + t) for m in modules)]
        if unknown:
            raise InvalidRequest(
                f"target_modules {unknown} do not exist in the base model "
                f"(its linear modules: {', '.join(sorted(self.base.modules))}).",
                param="target_modules",
            )

    # -- adapter_model.safetensors -----------------------------------------------------------------

    def _check_tensors(self, weights: Path) -> None:
        try:
            with safe_open(str(weights), framework="numpy") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidRequest(
                f"{WEIGHTS} is not a valid safetensors file ({exc}); re-save it.", param="path"
            ) from exc
        pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for key, shape in shapes.items():
            match = _TENSOR.match(key.removeprefix(_PEFT_PREFIX))
            if match is None:
                # Not silently skipped: the engine may load what Governor did not look at.
                raise InvalidRequest(
                    f"{WEIGHTS} holds tensor '{key}', which is not a LoRA matrix (lora_A/lora_B); only LoRA "
                    "weights are served (no modules_to_save, embedding LoRAs or DoRA vectors).",
                    param="path",
                )
            module, kind = match.group("module"), match.group("kind")
            self._check_tensor(key, module, kind, shape)
            if key.endswith(".weight"):
                pairs.setdefault(module, {})[kind] = (key, shape)
        if not pairs:
            raise InvalidRequest(
                f"{WEIGHTS} holds no LoRA tensors (lora_A/lora_B); is it a LoRA adapter?", param="path"
            )
        for module, found in pairs.items():
            if set(found) != {"lora_A", "lora_B"}:
                missing = "lora_B" if "lora_A" in found else "lora_A"
                raise InvalidRequest(f"{WEIGHTS} has no {missing} weight for module '{module}'.", param="path")
            (a_key, a_shape), (b_key, b_shape) = found["lora_A"], found["lora_B"]
            if a_shape[0] != b_shape[1]:
                raise InvalidRequest(
                    f"LoRA ranks disagree for module '{module}': '{a_key}' has rank {a_shape[0]}, "
                    f"'{b_key}' has rank {b_shape[1]}.",
                    param="rank",
                )

    def _check_tensor(self, key: str, module: str, kind: str, shape: tuple[int, ...]) -> None:
        base = self.base
        layer = layer_index(module)
        if layer is not None and base.num_hidden_layers is not None and layer >= base.num_hidden_layers:
            raise _mismatch(f"tensor '{key}' is for layer {layer}, but the base model has {base.num_hidden_layers}")
        if len(shape) != 2:
            raise InvalidRequest(f"LoRA tensor '{key}' has shape {list(shape)}; expected 2-D.", param="path")
        if key.endswith(".weight"):  # lora_A is [rank, in_features], lora_B [out_features, rank]
            self._rank(shape[0] if kind == "lora_A" else shape[1], f"tensor '{key}' rank")
        if not base.known:
            return
        expected = base.shapes.get(module)
        if expected is None:
            raise InvalidRequest(
                f"Adapter has weights for module '{module}', which the base model does not have.",
                param="target_modules",
            )
        out_features, in_features = expected
        if kind == "lora_A" and shape[1] != in_features:
            raise _mismatch(f"'{key}' takes {shape[1]} input features, the base module {in_features}")
        if kind == "lora_B" and key.endswith(".weight") and shape[0] != out_features:
            raise _mismatch(f"'{key}' produces {shape[0]} output features, the base module {out_features}")


def _mismatch(detail: str) -> GovernorError:
    return InvalidRequest(
        f"Adapter does not fit the base model: {detail}. It was trained on a different base model.",
        param="base_model",
    )
