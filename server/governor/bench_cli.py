"""`governor bench …` commands (kept apart from cli.py so the CLI stays small)."""

from __future__ import annotations

import asyncio

import typer


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("gateway")
    def gateway(
        gateway_url: str = typer.Option("", help="A running Governor (default: skip the engine part)."),
        engine_url: str = typer.Option("", help="The vLLM server behind it, called directly."),
        model: str = typer.Option("SmolLM2-135M-Instruct", help="Served model name."),
        concurrency: list[int] = typer.Option([8, 32], help="Concurrent streams (repeatable)."),
        reps: int = typer.Option(3, min=1, help="Repetitions per side (interleaved)."),
        preset: str = typer.Option("off", help="Decoding preset sent through the gateway."),
        relay: bool = typer.Option(True, help="Also run the relay-capacity mode against the fake engine."),
        relay_preset: str = typer.Option("balanced", help="Preset for the relay mode (balanced parses every event)."),
        relay_tokens: int = typer.Option(512, help="Events per stream in the relay mode."),
        relay_concurrency: int = typer.Option(32, help="Streams in the relay mode."),
    ) -> None:
        """Gateway vs direct vLLM (throughput ratio, TTFT delta) and relay capacity vs a fake engine."""
        from governor.bench import gateway as bench

        if gateway_url and engine_url:
            for line in asyncio.run(bench.engine_bench(gateway_url, engine_url, model, concurrency, reps, preset)):
                typer.echo(line)
        if relay:
            for line in asyncio.run(bench.relay_bench(relay_concurrency, relay_tokens, reps, relay_preset)):
                typer.echo(line)
