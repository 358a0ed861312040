"""The `governor` command. `serve` flags are generated from Settings, one per field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import typer

from governor import logs
from governor.settings import Settings

log = logging.getLogger("governor")

app = typer.Typer(no_args_is_help=True, help="Governor: an OpenAI-compatible gateway for vLLM.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded default model.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one run).")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")


def settings_options() -> list[click.Parameter]:
    """One --flag per Settings field; unset flags leave env/defaults in charge."""
    params: list[click.Parameter] = []
    for name, field in Settings.model_fields.items():
        flag = name.replace("_", "-")
        if field.annotation is bool:
            params.append(click.Option([f"--{flag}/--no-{flag}", name], default=None, help=field.description))
        else:
            params.append(click.Option([f"--{flag}", name], default=None, type=str, help=field.description))
    return params


def settings_from(values: dict[str, Any]) -> Settings:
    return Settings(**{k: v for k, v in values.items() if v is not None})


def serve(**values: Any) -> None:
    """Start the engine(s) and the gateway."""
    from governor.server import run

    settings = settings_from(values)
    logs.setup(settings.log_level)
    run(settings)


@model_app.command("prepare")
def model_prepare(cache_dir: Path = typer.Option(None, help="Default: GOVERNOR_CACHE_DIR.")) -> None:
    """Download and convert the embedded model once (a no-op when it is ready)."""
    from governor import embedded

    logs.setup("info")
    settings = Settings() if cache_dir is None else Settings(cache_dir=cache_dir)
    path = embedded.prepare(settings.cache_dir)
    log.info("embedded model: %s", path)


@model_app.command("path")
def model_path() -> None:
    """Print where the embedded model lives."""
    from governor import embedded

    typer.echo(embedded.embedded_model_dir(Settings().cache_dir))


def main() -> None:
    from governor import bench_cli

    bench_cli.register(bench_app)
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    group.add_command(click.Command("serve", callback=serve, params=settings_options(), help=serve.__doc__))
    group(prog_name="governor")


if __name__ == "__main__":
    main()
