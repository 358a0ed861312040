"""`governor adapters merge NAME_OR_PATH --out DIR`: the command around lora/merge.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from governor.errors import GovernorError
from governor.settings import Settings

# The engine's rank limit is a serving cost, not a merge constraint: any rank vLLM could serve is merged.
MAX_RANK = 512


def register(adapters: typer.Typer) -> None:
    """Add `merge` to the `governor adapters` group."""

    @adapters.command("merge")
    def merge(
        name_or_path: str = typer.Argument(..., help="Adapter folder, or its name under the adapters root."),
        out: Path = typer.Option(..., "--out", help="Folder to write the merged model to."),
        model: str = typer.Option(
            "", "--model", help="Base model folder; default: GOVERNOR_MODEL, else the embedded model."
        ),
        force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    ) -> None:
        """Bake adapter NAME_OR_PATH into the base model (float32) and write a complete model folder.

        Serve it with `governor serve --model DIR` and GOVERNOR_LORA=false: one fine-tuned model at base
        speed. Needs about 1.5x the model's float32 size in memory (4 bytes per parameter) and 1.1x on disk.
        """
        from governor.lora.merge import plan_merge, run_merge
        from governor.runtime.bootstrap import resolve_model

        settings = Settings(model=model) if model else Settings()
        _, served, base_dir = resolve_model(settings)
        if base_dir is None:
            _fail(f"The base model {settings.model!r} has no files on this machine: pass its folder with --model.")
        assert base_dir is not None
        # Staged copies of the validated adapter live only as long as the merge.
        with tempfile.TemporaryDirectory(prefix="governor-merge-") as staging:
            try:
                plan = plan_merge(
                    base_dir, served, name_or_path, out, adapters_dir=settings.adapters_dir,
                    staging_dir=Path(staging), max_rank=MAX_RANK, max_bytes=settings.max_adapter_bytes,
                    force=force,
                )  # fmt: skip
                run_merge(plan, lambda line: typer.echo(f">>> {line}"), force=force)
            except GovernorError as exc:
                _fail(exc.message)


def _fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)
