"""Every route a vLLM API server mounts, from the app itself: `python -m tests.integration.engine_routes ARGS...`
builds the app the way vLLM's api_server does (its own argument parser and `build_app`, which also runs
`model_hosting_container_standards`' SageMaker bootstrap and vLLM's endpoint plugins) from that server's
arguments, in the environment it is run with, and prints one JSON list of [kind, methods, path].

A separate process because importing vLLM takes ~20 s and registers Prometheus collectors; it starts no
engine. The task list is a generation model's (the embedded model's), which is what decides the routes
besides the arguments and the environment (VLLM_ALLOW_RUNTIME_LORA_UPDATING, VLLM_SERVER_DEV_MODE).
"""

from __future__ import annotations

import json
import sys

from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute


def describe(route: BaseRoute) -> list[object]:
    """[kind, methods, path]: a Mount (an ASGI app under a prefix, e.g. Prometheus' /metrics) as GET."""
    if isinstance(route, WebSocketRoute):
        return ["websocket", ["GET"], route.path]
    if isinstance(route, Mount):
        return ["mount", ["GET"], route.path]
    if isinstance(route, Route):
        return ["http", sorted(route.methods or ["GET"]), route.path]
    return ["other", ["GET"], str(getattr(route, "path", ""))]


def main(argv: list[str]) -> None:
    try:  # vLLM 0.32 moved the parser; 0.25 keeps it beside the server
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    app = build_app(args, ("generate",), None)
    sys.stdout.write(json.dumps([describe(r) for r in app.routes]) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
