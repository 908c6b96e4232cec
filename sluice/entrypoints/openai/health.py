"""GET /health and GET|POST /ping (200 empty when the engine answers, 503 when it is dead or
hung; /ping is the name SageMaker-style load balancers probe), /version, and /metrics
(Prometheus text format from the app's own registry).

A sleeping engine (--enable-sleep-mode, /sleep) is alive: as vLLM, /health stays 200 (a
liveness probe must not restart it), but says why generation is refused: a JSON body
{"status": "sleeping", "sleep_level": 1|2, "message": ...} and the header
`X-Engine-State: sleeping`, for readiness checks that should route elsewhere meanwhile."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sluice import __version__
from sluice.entrypoints.openai.errors import error_response
from sluice.entrypoints.openai.serving import get_state
from sluice.errors import EngineDeadError

router = APIRouter()

HEALTH_TIMEOUT_S = 5.0


@router.get("/health")
@router.get("/ping")
@router.post("/ping")
async def health(raw_request: Request) -> Response:
    state = get_state(raw_request)
    try:
        await asyncio.wait_for(state.engine.check_health(), HEALTH_TIMEOUT_S)
    except EngineDeadError as e:
        return error_response(503, str(e))
    except asyncio.TimeoutError:
        return error_response(503, f"The engine did not answer a health check within "
                              f"{HEALTH_TIMEOUT_S:g} s.")
    level = getattr(state.engine, "sleep_level", 0)
    if level:
        return JSONResponse({"status": "sleeping", "sleep_level": level,
                             "message": str(state.engine.sleeping_error())},
                            headers={"X-Engine-State": "sleeping"})
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    state = get_state(raw_request)
    if state.metrics is None:
        return Response(b"", media_type="text/plain; version=0.0.4; charset=utf-8")
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
