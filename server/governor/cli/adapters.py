"""`governor adapters list|load|unload|pin`: the admin API over HTTP, for operators at a shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import typer

COLUMNS = ("name", "state", "pinned", "version", "in_flight", "source", "path", "reason")


class AdminClient:
    """A small client for /admin/adapters; an error prints the server's message and exits 1."""

    def __init__(self, url: str, admin_key: str | None, timeout: float = 150.0) -> None:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.request(method, "/admin/adapters" + path, json=body)
        except httpx.HTTPError as exc:
            fail(f"cannot reach Governor at {self.http.base_url}: {exc}")
        try:
            data = response.json()
        except ValueError:
            data = {"error": {"message": response.text[:500]}}
        if response.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            fail(f"HTTP {response.status_code}: {err.get('message', data)}")
        return data


def fail(message: str) -> Any:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def table(rows: list[dict[str, Any]]) -> str:
    """Compact fixed-width table of adapters."""
    cells = [[_cell(row.get(col)) for col in COLUMNS] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(COLUMNS)]
    lines = ["  ".join(col.upper().ljust(w) for col, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)[:80]


def _echo(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def register(app: typer.Typer) -> typer.Typer:
    """Add the `adapters` command group to the `governor` CLI; returns the group."""
    adapters = typer.Typer(no_args_is_help=True, help="Manage LoRA adapters on a running Governor.")
    app.add_typer(adapters, name="adapters")

    @adapters.callback()
    def connect(
        ctx: typer.Context,
        url: str = typer.Option("http://127.0.0.1:8000", envvar="GOVERNOR_URL", help="Governor base URL."),
        admin_key: str = typer.Option("", envvar="GOVERNOR_ADMIN_KEY", hidden=True, show_default=False),
        admin_key_file: Path | None = typer.Option(
            None, envvar="GOVERNOR_ADMIN_KEY_FILE", help="A file holding the admin key (or set GOVERNOR_ADMIN_KEY)."
        ),
    ) -> None:
        source = ctx.get_parameter_source("admin_key")  # typer's own click: compared by name
        if source is not None and source.name == "COMMANDLINE":
            raise typer.BadParameter(
                "a key on the command line is visible to every local user (ps); set GOVERNOR_ADMIN_KEY in the "
                "environment, or GOVERNOR_ADMIN_KEY_FILE (or --admin-key-file) to a file holding it.",
                param_hint="--admin-key",
            )
        if admin_key_file is not None and not admin_key:
            try:
                admin_key = admin_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                fail(f"cannot read the admin key file {admin_key_file}: {exc.strerror or exc}")
        ctx.obj = AdminClient(url, admin_key or None)

    @adapters.command("list")
    def list_(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List registered adapters and their states."""
        rows = ctx.obj.call("GET", "")["data"]
        if as_json:
            _echo(rows)
        else:
            typer.echo(table(rows) if rows else "no adapters registered")

    @adapters.command("load")
    def load(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="Model name clients will use."),
        path: str = typer.Argument(..., help="Adapter folder, relative to the adapters root."),
        pin: bool = typer.Option(False, "--pin", help="Pin it (never evicted)."),
    ) -> None:
        """Load adapter folder PATH as model NAME (a changed folder becomes a new version)."""
        body: dict[str, Any] = {"name": name, "path": path}
        if pin:
            body["pin"] = True
        _echo(ctx.obj.call("POST", "", body))

    @adapters.command("unload")
    def unload(ctx: typer.Context, name: str = typer.Argument(..., help="Adapter name.")) -> None:
        """Unload and unregister adapter NAME (requests in flight finish first)."""
        _echo(ctx.obj.call("DELETE", f"/{quote(name, safe='')}"))

    @adapters.command("pin")
    def pin(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="Adapter name."),
        off: bool = typer.Option(False, "--off", help="Unpin instead."),
    ) -> None:
        """Pin adapter NAME (keep it loaded), or unpin it with --off."""
        _echo(ctx.obj.call("POST", f"/{quote(name, safe='')}/{'unpin' if off else 'pin'}"))

    return adapters
