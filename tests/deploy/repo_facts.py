"""What the deploy files must agree with: the app's real routes and settings, and the Dockerfiles."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from governor.api.ops_routes import router
from governor.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "gpu": DEPLOY / "docker" / "Dockerfile.gpu"}


def ops_paths() -> set[str]:
    """Paths of the operator routes (/health, /ready, /metrics) as the app registers them."""
    return {route.path for route in router.routes}


def unknown_settings(names: Iterable[str]) -> list[str]:
    """GOVERNOR_* names that are not a Settings field (the app ignores them silently: a typo goes unseen)."""
    fields = set(Settings.model_fields)
    return sorted(n for n in names if n.startswith("GOVERNOR_") and n.removeprefix("GOVERNOR_").lower() not in fields)


@dataclass
class Dockerfile:
    """The instructions of one Dockerfile, continuation lines joined and comments dropped."""

    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        out = cls(path)
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue  # Docker drops comment lines, also inside a continued instruction
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = pending + line
            pending = ""
            keyword, _, args = full.partition(" ")
            out.instructions.append((keyword.upper(), args.strip()))
        assert not pending, f"{path}: dangling line continuation"
        return out

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON (exec) form of the last `keyword` instruction."""
        found = self.args(keyword)
        assert found, f"{self.path.name}: no {keyword}"
        value = json.loads(found[-1])
        assert isinstance(value, list), f"{self.path.name}: {keyword} is not in exec form"
        return value

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.args("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"{self.path.name}: use ENV KEY=VALUE ({item!r})"
                out[key] = value
        return out

    def arg_defaults(self) -> dict[str, str]:
        out = {}
        for args in self.args("ARG"):
            key, _, value = args.partition("=")
            out[key] = value
        return out

    def created_uid(self, user: str) -> int | None:
        """The uid a RUN `useradd --uid` gives `user` (ARG defaults substituted)."""
        args = self.arg_defaults()
        for run in self.args("RUN"):
            m = re.search(r"useradd\b[^&]*?--uid\s+\"?\$?\{?(\w+)\}?\"?[^&]*?\s" + re.escape(user) + r"\b", run)
            if m:
                value = args.get(m.group(1), m.group(1))
                return int(value)
        return None
