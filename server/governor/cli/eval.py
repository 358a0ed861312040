"""The `governor eval loops` command (imports the eval lazily, so the CLI starts fast)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer


def register(eval_app: typer.Typer) -> None:
    @eval_app.command("loops")
    def loops(
        url: str = typer.Option("http://127.0.0.1:8000", help="Any OpenAI-compatible server."),
        model: str = typer.Option("SmolLM2-135M-Instruct", help="Model name to request."),
        config: list[str] = typer.Option(
            [], help="Configs to run (default: presets + blunt controls); also preset+field=value+… variants."
        ),
        split: str = typer.Option("all", help="all, tune or holdout (the part never tuned on)."),
        category: list[str] = typer.Option([], help="Only these categories (repeatable)."),
        limit: int = typer.Option(0, help="Prompts per category (0 = all)."),
        temperature: list[float] = typer.Option([0.0, 0.7], help="Temperatures (repeatable); 0 is greedy."),
        seeds: int = typer.Option(3, min=1, help="Seeds at temperature > 0 for the --seeded configs."),
        seeded: list[str] = typer.Option(["off", "balanced"], help="Configs sampled with --seeds seeds; others one."),
        first_seed: int = typer.Option(0, min=0, help="Sampled seeds count from here (add seeds to a saved run)."),
        max_tokens: int = typer.Option(384, help="Output limit per answer (long answers set their own 1024)."),
        concurrency: int = typer.Option(32, help="Requests in flight."),
        api_key: str = typer.Option("", envvar="GOVERNOR_EVAL_API_KEY", help="Bearer key, if the server wants one."),
        answers: Path | None = typer.Option(None, help="Write every answer and verdict here (JSON lines)."),
        details: bool = typer.Option(False, help="List the prompts that still loop, per run."),
    ) -> None:
        """Loop rate (judged by governor.eval.judge), length stops, factual and intended-repetition accuracy,
        tokens, per category and for the held-out part."""
        from governor.eval import loops as ev
        from governor.eval import report

        if split not in ("all", "tune", "holdout"):
            raise typer.BadParameter("split must be all, tune or holdout")
        prompts = ev.load_prompts(split, category, limit)
        for name in config or ():  # a typo must not surface after an hour of other configs
            try:
                ev.config_fields(name)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--config") from exc
        runs = ev.plan(config or ev.DEFAULT_CONFIGS, temperature, seeds, seeded, first_seed)

        if answers is not None:
            report.write_answers(answers, [])  # empty now: a run that ends early leaves only its own answers

        def progress(run: ev.Run) -> None:
            if answers is not None:  # as each run ends, so a long eval cut short keeps what it measured
                report.write_answers(answers, [run], append=True)
            m = ev.metrics(run)
            typer.echo(f"# {run.config} t={run.temperature:g} seed={run.seed}: loops {m.loop_rate:.1%}, "
                       f"{m.tokens} tokens, {run.seconds:.0f} s", err=True)  # fmt: skip

        done = asyncio.run(ev.run_eval(url, model, runs, prompts, max_tokens, concurrency, api_key, progress))
        typer.echo(f"{len(prompts)} prompts ({split}), max_tokens {max_tokens} (long: 1024), {url}")
        typer.echo(report.full_report(done, split))
        if details:
            for run in done:
                typer.echo(f"{run.config} t={run.temperature:g} seed={run.seed}: looping {report.looping(run)}")

    @eval_app.command("report")
    def report_cmd(
        answers: list[Path] = typer.Argument(..., help="`governor eval loops --answers` files (JSON lines)."),
        common: bool = typer.Option(
            False, help="Only prompts every run answered: a request error in any run drops that prompt everywhere."
        ),
        details: bool = typer.Option(False, help="List the prompts that still loop, per run."),
        category: list[str] = typer.Option([], help="Only these categories (repeatable)."),
        paired: str = typer.Option(
            "", help="Also compare this config with each other one, answer for answer at the seeds both ran."
        ),
    ) -> None:
        """Tables from saved answers, re-judged here (e.g. an eval run on a GPU machine)."""
        from governor.eval import loops as ev
        from governor.eval import paired as pairing
        from governor.eval import report

        try:
            runs = report.read_answers(answers)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="answers") from exc
        if category:
            unknown = sorted(set(category) - set(ev.CATEGORIES))
            if unknown:
                known = ", ".join(ev.CATEGORIES)
                raise typer.BadParameter(f"unknown {unknown}; known: {known}", param_hint="--category")
            runs = [run.part(lambda p: p["category"] in category) for run in runs]
        if common:
            runs, dropped = report.common_part(runs)
            typer.echo(f"{len(dropped)} prompts dropped (a request error in some run): {sorted(dropped)}")
        if paired and not any(run.config == paired for run in runs):
            raise typer.BadParameter(f"no run of config {paired!r} in these answers", param_hint="--paired")
        typer.echo(report.full_report(runs, "all"))
        if paired:
            typer.echo("\n" + pairing.table(paired, pairing.compare(runs, paired)))
        if details:
            for run in runs:
                typer.echo(f"{run.config} t={run.temperature:g} seed={run.seed}: looping {report.looping(run)}")
