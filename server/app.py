"""steerserve's HTTP layer on top of the app `vllm serve` builds.

vLLM's app keeps its routes (`/v1/models`, `/health`, `/metrics`, tokenize, ...), its
exception handlers and its request handling; this module adds:

- our `POST /v1/chat/completions` and `POST /v1/completions` in front of vLLM's (same
  handlers underneath, plus the `steering` field: `generation.py`),
- `GET /v1/vectors`, `GET /v1/presets`, `POST /v1/admin/reload`,
- `GET /v1/steering/capabilities` (what the model and these switches accept),
- A/B experiments: admin routes, `POST /v1/feedback`, reports (`experiments/routes.py`),
- OpenAI-shaped 401/413 from our own middleware, steerserve metrics on `/metrics`,
- the browser playground at `/playground` (`playground.py`).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware import Middleware

from steering.engine import openai_server as vllm_api

from . import calls, capabilities, generation, playground, registry_routes, sae_routes
from .applied import SteeringResolver
from .bodies import add_body_schemas
from .errors import APIError, api_error_handler
from .experiments import routes as experiment_routes
from .experiments.service import Experiments
from .metrics import ExperimentMetrics, SteeringMetrics
from .middleware import Authenticate, BodyLimit, RefreshGauges
from .readouts import ReadoutFeed
from .settings import ServerSettings
from .state import ServerState


def extend_app(app: FastAPI, engine: vllm_api.EngineClient, settings: ServerSettings) -> FastAPI:
    frontend = vllm_api.frontend(engine)
    if frontend is not None:
        if settings.max_inline_floats is not None:
            frontend.context.max_inline_floats = settings.max_inline_floats
        registry_routes.check_presets(frontend, settings.presets)
        frontend.context.presets = settings.presets
    elif settings.presets or settings.default_spec:
        raise ValueError("--presets/--default-steering need steering enabled in the engine")
    model_name = engine.model_config.served_model_name
    if isinstance(model_name, list):
        model_name = model_name[0]
    model_name = str(model_name or engine.model_config.model)
    resolver = SteeringResolver(frontend, settings.default_spec)
    try:
        experiments = Experiments(
            settings.database_url,
            resolver.parse_arm,
            ExperimentMetrics(model_name),
            settings.experiments,
        )
    except ValueError as e:  # an arm that does not fit the served model
        raise ValueError(f"--experiments: {e}") from None
    state = ServerState(
        engine=engine,
        frontend=frontend,
        resolver=resolver,
        metrics=SteeringMetrics(model_name),
        settings=settings,
        experiments=experiments,
        readouts=ReadoutFeed(engine),
    )
    app.state.steerserve = state
    calls.observe_engine(engine)
    experiments.start()

    vllm_api.put_routes_first(
        app,
        [
            *generation.router.routes,
            *registry_routes.router.routes,
            *sae_routes.router.routes,
            *capabilities.router.routes,
            *experiment_routes.router.routes,
            *playground.router.routes,
            playground.assets,
        ],
    )
    add_body_schemas(app)
    app.add_exception_handler(APIError, api_error_handler)

    async def refresh_gauges() -> None:
        state.metrics.set_slots(await vllm_api.worker_stats(engine))

    # Outermost first: the body limit and keys apply before anything reads the request.
    vllm_api.add_outer_middleware(
        app,
        [
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
            Middleware(Authenticate, api_keys=settings.api_keys, admin_key=settings.admin_key),
            Middleware(RefreshGauges, refresh=refresh_gauges),
        ],
    )
    return app
