"""Per-app state of the steering layer, reached from a route through `state_of(request)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from steering.engine.frontend import SteeringFrontend

from .applied import SteeringResolver
from .experiments.service import Experiments
from .metrics import SteeringMetrics
from .readouts import ReadoutFeed
from .settings import ServerSettings


@dataclass
class ServerState:
    engine: Any  # vLLM's EngineClient (AsyncLLM)
    frontend: SteeringFrontend | None  # None when steering is disabled for the engine
    resolver: SteeringResolver
    metrics: SteeringMetrics
    settings: ServerSettings
    experiments: Experiments
    readouts: ReadoutFeed  # batched worker pulls of readout values


def state_of(request: Request) -> ServerState:
    return request.app.state.steerserve
