"""The `governor` command. `serve` flags are generated from Settings, one per field."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import typer

from governor import logs
from governor.settings import SECRETS, Settings

log = logging.getLogger("governor")

app = typer.Typer(no_args_is_help=True, help="Governor: an OpenAI-compatible gateway for vLLM.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded default model.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one run).")
app.add_typer(model_app, name="model")
eval_app = typer.Typer(no_args_is_help=True, help="Quality evaluations.")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")


def _serve_parameters() -> list[inspect.Parameter]:
    """One --flag per Settings field; unset flags (None) leave env and defaults in charge. A secret's flag is
    hidden and refused (see `serve`): parsed only to say what to do instead."""
    params = []
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=field.description, show_default=False)
            annotation: Any = bool | None
        else:
            option = typer.Option(None, flag, help=field.description, show_default=False, hidden=name in SECRETS)
            annotation = str | None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def settings_from(values: dict[str, Any]) -> Settings:
    return Settings(**{k: v for k, v in values.items() if v is not None})


def serve(**values: Any) -> None:
    """Start the engine(s) and the gateway."""
    from governor.runtime.server import run

    for name in SECRETS:
        if values.get(name) is not None:
            env = f"GOVERNOR_{name.upper()}"
            raise typer.BadParameter(
                f"a key on the command line is visible to every local user (ps, /proc/PID/cmdline); set {env} "
                f"in the environment, or {env}_FILE to a file holding it.",
                param_hint="--" + name.replace("_", "-"),
            )
    settings = settings_from(values)
    logs.setup(settings.log_level)
    run(settings)


serve.__signature__ = inspect.Signature(_serve_parameters())  # type: ignore[attr-defined]
app.command("serve")(serve)


@model_app.command("prepare")
def model_prepare(cache_dir: Path = typer.Option(None, help="Default: GOVERNOR_CACHE_DIR.")) -> None:
    """Download and convert the embedded model once (a no-op when it is ready)."""
    from governor.model import embedded

    logs.setup("info")
    settings = Settings() if cache_dir is None else Settings(cache_dir=cache_dir)
    path = embedded.prepare(settings.cache_dir)
    log.info("embedded model: %s", path)


@model_app.command("path")
def model_path() -> None:
    """Print where the embedded model lives."""
    from governor.model import embedded

    typer.echo(embedded.embedded_model_dir(Settings().cache_dir))


def main() -> None:
    from governor.cli import bench as bench_cli

    bench_cli.register(bench_app)
    bench_cli.register_processors(bench_app)
    bench_cli.register_merge(bench_app)
    bench_cli.register_adapters(bench_app)
    bench_cli.register_soak(bench_app)
    bench_cli.register_eval(eval_app)
    from governor.cli import adapters as lora_cli
    from governor.cli import merge as merge_cli

    merge_cli.register(lora_cli.register(app))
    app(prog_name="governor")


if __name__ == "__main__":
    main()
