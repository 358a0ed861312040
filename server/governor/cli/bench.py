"""`governor bench …` commands (kept apart from cli.py so the CLI stays small)."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
        waves: int = typer.Option(2, min=1, help="Requests per run = waves x concurrency."),
        relay_requests: int = typer.Option(0, help="Requests per relay run (0 = 2 x relay concurrency)."),
        cpu: bool = typer.Option(False, help="The gateway's CPU per event vs the API server's, on a real engine."),
        cpu_preset: list[str] = typer.Option(["off", "balanced"], help="Presets of the --cpu mode (repeatable)."),
        cpu_tokens: int = typer.Option(256, help="Tokens per stream in the --cpu mode."),
        profile: bool = typer.Option(False, help="--cpu: also sample the gateway with py-spy (one more run)."),
        local: bool = typer.Option(False, help="--cpu: Governor starts the engine on its socket (no direct side)."),
        relay_workers: int = typer.Option(
            1, min=1, max=64, help="--cpu: with N > 1, Governor as 1 process against N (owner + relay workers)."
        ),
    ) -> None:
        """Gateway vs direct vLLM (throughput ratio, TTFT delta) and relay capacity vs a fake engine;
        --cpu: the gateway's CPU per event vs vLLM's API server, both measured in the same runs."""
        from governor.bench import gateway as bench

        if cpu and relay_workers > 1:
            from governor.bench import relay_workers as workers_bench
            from governor.settings import Settings

            for line in workers_bench.run(Settings(), concurrency, cpu_preset, cpu_tokens, reps, waves, relay_workers):
                typer.echo(line)
            return
        if cpu:
            from governor.bench import relay_cpu
            from governor.settings import Settings

            for line in relay_cpu.run(Settings(), concurrency, cpu_preset, cpu_tokens, reps, waves, profile, local):
                typer.echo(line)
            return
        if gateway_url and engine_url:
            for c in concurrency:
                typer.echo(asyncio.run(bench.engine_bench(gateway_url, engine_url, model, c, reps, preset, waves)))
        if relay:
            for line in asyncio.run(
                bench.relay_bench(relay_concurrency, relay_tokens, reps, relay_preset, relay_requests)
            ):
                typer.echo(line)

    @bench_app.command("load")
    def load(
        host: str = typer.Option("http://127.0.0.1:8000", help="Server root; loopback unless --allow-remote."),
        users: int = typer.Option(4, "--users", "-u", min=1, max=10000, help="Concurrent users (closed loop)."),
        spawn_rate: float = typer.Option(0.0, "--spawn-rate", "-r", min=0, help="Users/s (0: all at once)."),
        run_time: str = typer.Option("60s", "--run-time", "-t", help="How long: 30s, 5m, 1h30m (at most 24h)."),
        iterations: int = typer.Option(0, min=0, help="Stop after this many requests in all (0: run time only)."),
        mix: list[str] = typer.Option(["base"], envvar="GOVERNOR_LT_MIX", help="base, adapters, loops, long."),
        model: str = typer.Option("", envvar="GOVERNOR_LT_MODEL", help="Model (default: first in /v1/models)."),
        max_tokens: int = typer.Option(64, envvar="GOVERNOR_LT_MAX_TOKENS", min=1, help="max_tokens per request."),
        preset: str = typer.Option("balanced", envvar="GOVERNOR_LT_PRESET", help="Preset of the loops mix."),
        adapters: str = typer.Option("", envvar="GOVERNOR_LT_ADAPTERS", help='Adapter weights, "a:3,b:1".'),
        governor: bool = typer.Option(True, envvar="GOVERNOR_LT_GOVERNOR", help="--no-governor: plain vLLM."),
        api_key: str = typer.Option("", envvar="GOVERNOR_LT_API_KEY", help="Bearer key, if the server wants one."),
        results: Path | None = typer.Option(None, help="Report folder (default: results/load-<timestamp>/)."),
        locustfile: Path | None = typer.Option(None, help="Default: loadtests/locustfile.py here or in the checkout."),
        allow_remote: bool = typer.Option(False, help="Allow a host that is not loopback."),
        stop_timeout: int = typer.Option(5, min=0, max=600, help="Seconds in-flight requests get at the end."),
        max_error_rate: float = typer.Option(0.0, min=0, max=1, help="Fail above this fraction of failed requests."),
        max_ttft_p95_ms: float | None = typer.Option(None, help="Fail when a request class has a higher TTFT p95."),
    ) -> None:
        """Locust load (TTFT, TPOT, output tokens/s) with CSV + HTML reports; exits 1 when a threshold breaks."""
        from governor.bench import locust_run

        opts = locust_run.LoadOptions(
            host=host, users=users, spawn_rate=spawn_rate or None, run_time=run_time, iterations=iterations,
            mixes=mix, model=model, max_tokens=max_tokens, preset=preset, adapters=adapters, governor=governor,
            api_key=api_key, stop_timeout=stop_timeout, results=results, locustfile=locustfile,
            allow_remote=allow_remote, max_error_rate=max_error_rate, max_ttft_p95_ms=max_ttft_p95_ms,
        )  # fmt: skip
        code = locust_run.run_load(opts, typer.echo)
        if code:
            raise typer.Exit(code)


def register_adapters(bench_app: typer.Typer) -> None:
    @bench_app.command("adapters")
    def adapters(
        count: int = typer.Option(64, min=4, max=1000, help="Adapters made and served."),
        concurrency: int = typer.Option(16, min=1, help="Concurrent streams."),
        requests: int = typer.Option(64, min=1, help="Requests per run."),
        reps: int = typer.Option(5, min=1, help="Repetitions per side (interleaved)."),
        max_tokens: int = typer.Option(32, min=1, help="Output tokens per request."),
        eager: bool = typer.Option(True, help="--enforce-eager engines (faster start)."),
        mixes: str = typer.Option("hot,round-robin,zipf", help="Which mixes to run, comma-separated."),
    ) -> None:
        """4 hot, N round-robin and N Zipf adapters: Governor vs vLLM direct (all given at start), same run."""
        from governor.bench import adapters as bench
        from governor.settings import Settings

        for line in bench.run(Settings(enforce_eager=eager), count, concurrency, requests, reps, max_tokens,
                              mixes.split(",")):  # fmt: skip
            typer.echo(line)


def register_merge(bench_app: typer.Typer) -> None:
    @bench_app.command("merge")
    def merge(
        concurrency: int = typer.Option(32, min=1, help="Concurrent streams."),
        reps: int = typer.Option(4, min=1, help="Repetitions per side (interleaved)."),
        waves: int = typer.Option(2, min=1, help="Requests per run = waves x concurrency."),
        eager: bool = typer.Option(True, help="--enforce-eager engines (faster start)."),
    ) -> None:
        """A merged adapter with LoRA off vs the same adapter through LoRA: throughput ratio, same run."""
        from governor.bench import merge as bench
        from governor.settings import Settings

        for line in bench.run(Settings(enforce_eager=eager), concurrency, reps, waves):
            typer.echo(line)


def register_processors(bench_app: typer.Typer) -> None:
    @bench_app.command("processors")
    def processors(
        concurrency: list[int] = typer.Option([32, 128], help="Concurrent streams (repeatable)."),
        reps: int = typer.Option(3, min=1, help="Repetitions per side, active vs plain (interleaved)."),
        unused_reps: int = typer.Option(5, min=1, help="Repetitions per side, loaded-unused vs absent."),
        preset: list[str] = typer.Option(["balanced"], help="Presets whose processor args are measured."),
        waves: int = typer.Option(1, min=1, help="Requests per run = waves x concurrency."),
        lora: bool = typer.Option(False, help="Start the engines with LoRA enabled."),
        eager: bool = typer.Option(True, help="--enforce-eager engines (faster start)."),
        synthetic: bool = typer.Option(False, help="No engine: time the processors' steps directly."),
        device: str = typer.Option("", help="Synthetic: torch device (default cuda when available, else cpu)."),
        batch: list[int] = typer.Option([8, 64, 256, 1024], help="Synthetic: batch sizes (repeatable)."),
        prompt_tokens: int = typer.Option(1024, min=1, help="Synthetic: prompt tokens per row."),
        output_tokens: int = typer.Option(1024, min=16, help="Synthetic: output tokens per row by the last step."),
        steps: int = typer.Option(10, min=1, help="Synthetic: measured steps per configuration."),
        only: list[str] = typer.Option([], help="Synthetic: dry, ngram, window_penalty, balanced, strict."),
        reference: bool = typer.Option(False, help="Synthetic: time the slow per-row reference processors."),
        threads: int = typer.Option(1, min=0, help="Synthetic: torch CPU threads (0: torch's default)."),
        scaling_only: bool = typer.Option(False, help="Synthetic: only the python_scaling shapes (seconds)."),
        scaling_reps: int = typer.Option(3, min=1, help="Synthetic: interleaved (8, 1024) pairs for python_scaling."),
        churn: bool = typer.Option(False, help="Synthetic: replace requests as they finish (host_scaling, compare)."),
        output_length: int = typer.Option(256, min=2, help="Churn: output tokens of each request."),
        churn_lag: int = typer.Option(1, min=0, help="Churn: steps before a finished request's replacement arrives."),
        churn_reps: int = typer.Option(5, min=1, help="Churn: interleaved repetitions of every measurement."),
    ) -> None:
        """Throughput with the anti-loop processors active / plain, and loaded-but-unused / absent;
        --synthetic: per-step milliseconds and python_scaling without an engine; --synthetic --churn: with
        requests replaced at batch / output length per step, host_scaling and Governor vs separate processors."""
        from governor.settings import Settings

        settings = Settings(lora=lora, enforce_eager=eager)
        if synthetic:
            import torch

            from governor.bench import processors_synthetic as synth

            name = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if churn:
                from governor.bench import processors_churn

                for line in processors_churn.run(settings, name, batch, prompt_tokens, output_tokens, output_length,
                                                 churn_lag, steps, preset, threads, churn_reps):  # fmt: skip
                    typer.echo(line)
                return
            impl = "reference" if reference else ""
            lines = synth.run(settings, name, batch, prompt_tokens, output_tokens, steps, only, impl, threads,
                              scaling_only, scaling_reps)  # fmt: skip
            for line in lines:
                typer.echo(line)
            return
        from governor.bench import processors as bench

        for line in bench.run(settings, concurrency, reps, waves, preset, unused_reps):
            typer.echo(line)


def register_soak(bench_app: typer.Typer) -> None:
    @bench_app.command("soak")
    def soak(
        url: str = typer.Option("http://127.0.0.1:8000", help="Governor to soak (loopback)."),
        model: str = typer.Option("SmolLM2-135M-Instruct", help="Model name."),
        clients: int = typer.Option(200, min=1, help="Concurrent streaming clients."),
        seconds: float = typer.Option(300, min=1, help="How long (bounded)."),
        max_tokens: int = typer.Option(16, min=1, help="Output tokens per request."),
    ) -> None:
        """Concurrent streams for a bounded time: every stream must end cleanly; RSS growth reported."""
        from governor.bench.soak import soak as run

        result = asyncio.run(run(url, model, clients, seconds, max_tokens))
        typer.echo(result.summary())
        bad = result.outcomes["truncated"] + result.outcomes["server_error"]
        if bad or any(code >= 500 for code in result.statuses):
            raise typer.Exit(1)


def register_eval(eval_app: typer.Typer) -> None:
    from governor.cli.eval import register as register_loops  # the eval owns its command

    register_loops(eval_app)
