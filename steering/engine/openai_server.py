"""The pieces of vLLM's OpenAI-compatible server that steerserve's HTTP layer builds on.

Everything `server/` needs from vLLM's entrypoints is named here, so that the internals it
relies on sit next to the engine hooks, pinned to the same release and checked by
`compat.check_openai_server`:

- the `vllm serve` argument parser (engine and frontend flags, not retyped),
- the app vLLM builds (its routes, handlers and exception handlers), our additions are
  attached before its state is initialised,
- its request models and the serving handlers the routes call,
- how the engine names the requests of one HTTP call (for per-request reports),
- its admission check (`--max-num-queued-reqs`), so a full queue is refused before a
  streamed response has started,
- the three places steerserve changes vLLM's objects in a server process: the engine's
  `generate` (observed per HTTP call), the app's route list (ours first) and its
  middleware stack (ours outermost).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.exceptions import GracefulHTTPError
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.exceptions import EngineDeadError

from steering.engine.frontend import SteeringFrontend, frontend_of
from steering.engine.worker import conditions_async as worker_conditions
from steering.engine.worker import readout_pull_async as worker_readout_pull
from steering.engine.worker import reports_async as worker_reports
from steering.engine.worker import stats_async as worker_stats

__all__ = [
    "worker_conditions",
    "worker_readout_pull",
    "worker_reports",
    "worker_stats",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "EngineClient",
    "EngineDeadError",
    "ErrorResponse",
    "GracefulHTTPError",
    "with_cancellation",
]


def arg_parser(prog: str) -> FlexibleArgumentParser:
    """vLLM's own `serve` parser: every engine and frontend flag, with vLLM's help."""
    return make_arg_parser(FlexibleArgumentParser(prog=prog))


def validate_args(args: argparse.Namespace) -> None:
    if getattr(args, "model_tag", None):
        args.model = args.model_tag  # `vllm serve MODEL` and `--model MODEL` both work
    validate_parsed_serve_args(args)


async def run_server(
    args: argparse.Namespace,
    extend: Callable[[FastAPI, EngineClient], Awaitable[FastAPI]],
) -> None:
    """`vllm serve` with `extend(app, engine)` run on vLLM's app before it serves.

    The same sequence as vLLM's single-process API server (bind first, build the engine,
    build the app, initialise its state, serve), with one step added.
    """
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine:
        uvicorn_kwargs: dict[str, Any] = {}
        log_config = get_uvicorn_log_config(args)
        if log_config is not None:
            uvicorn_kwargs["log_config"] = log_config
        supported_tasks = await engine.get_supported_tasks()
        app = build_app(args, supported_tasks, engine.model_config)
        app = await extend(app, engine)
        await init_app_state(engine, app.state, args, supported_tasks)
        shutdown = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
            **uvicorn_kwargs,
        )
    try:
        await shutdown
    finally:
        sock.close()


def serving_chat(app: FastAPI) -> Any:
    return getattr(app.state, "openai_serving_chat", None)


def serving_completion(app: FastAPI) -> Any:
    return getattr(app.state, "openai_serving_completion", None)


def frontend(engine: EngineClient) -> SteeringFrontend | None:
    """The engine's spec front end (None when steering is disabled for it)."""
    return frontend_of(engine.input_processor)


def admit(engine: EngineClient, n: int) -> None:
    """Raise vLLM's own 503 error now if `n` more sequences would overflow its queue."""
    engine.check_admission(n)


def engine_errored(engine: EngineClient) -> bool:
    return bool(engine.errored)


def response_id(raw_request: Any, request: Any, *, chat: bool) -> str:
    """The id vLLM's handler gives the response: its prefix, then the `X-Request-Id`
    header if sent, else the request model's `request_id` (a fresh uuid by default)."""
    base = raw_request.headers.get("X-Request-Id") or request.request_id
    return f"{'chatcmpl' if chat else 'cmpl'}-{base}"


def first_token_latency(output: Any) -> float | None:
    """Seconds from the engine request's arrival to its first token, as vLLM's own TTFT
    metric measures it (None if the engine keeps no per-request stats, or no token yet).

    Needed because a non-streamed request's output stream yields only its final output,
    so watching the stream would put the first token at the last one."""
    stats = getattr(output, "metrics", None)
    latency = getattr(stats, "first_token_latency", 0.0)
    return latency if isinstance(latency, float) and latency > 0 else None


def observe_generate(
    engine: EngineClient, watch: Callable[[AsyncGenerator, str], AsyncGenerator]
) -> None:
    """Pass every output stream of `engine.generate` through `watch(outputs, request_id)`.

    vLLM's handlers call `generate` themselves; this is the one way to see the engine
    requests an HTTP call makes (token counts, first-token times, engine request ids)
    without re-implementing the handlers.
    """
    original = engine.generate

    def generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kw: Any):
        return watch(original(prompt, sampling_params, request_id, *args, **kw), request_id)

    engine.generate = generate  # type: ignore[method-assign]


def put_routes_first(app: FastAPI, routes: Sequence[Any]) -> None:
    """Serve `routes` ahead of vLLM's, replacing any of its with the same path and method."""
    ours = {(r.path, m) for r in routes if isinstance(r, APIRoute) for m in r.methods}
    kept = [
        r
        for r in app.router.routes
        if not (isinstance(r, APIRoute) and any((r.path, m) in ours for m in r.methods))
    ]
    app.router.routes[:] = [*routes, *kept]
    app.openapi_schema = None  # rebuilt with our routes on the next /openapi.json


def add_outer_middleware(app: FastAPI, middleware: Sequence[Middleware]) -> None:
    """Run `middleware` (outermost first) before vLLM's own middleware and routes.

    vLLM's app has built its middleware stack already (`add_middleware` refuses), so ours
    goes ahead of its list and Starlette rebuilds the stack on the first request.
    """
    app.user_middleware[0:0] = list(middleware)
    app.middleware_stack = None
