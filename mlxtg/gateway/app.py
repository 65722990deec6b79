"""The gateway app factory: stateless HTTP front of the supervisor."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..protocol import ControlOp
from . import openapi, ui
from .anthropic_routes import router as anthropic_router
from .client import SupervisorClient
from .deps import Client, Metrics, require_key
from .drain import Drain, refuse_while_draining
from .errors import BadRequest, NotFound, Unavailable, install_handlers
from .guards import Guards, require_json
from .metrics import GatewayMetrics
from .openai_routes import router as openai_router
from .responses_routes import router as responses_router
from .settings import GatewaySettings
from .tokenize_routes import router as tokenize_router

log = logging.getLogger("mlxtg.gateway")


def create_app(settings: GatewaySettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = SupervisorClient(settings.supervisor_endpoint)
        await client.start()
        app.state.client = client
        try:
            yield
        finally:
            await client.close()

    # /docs, /redoc and /openapi.json are served by openapi.install, behind the key.
    app = FastAPI(
        title="mlxtg",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()
    app.state.drain = Drain(settings.drain_timeout)  # SIGTERM starts it (see __main__)
    install_handlers(app)
    # Host check and body limit; inside CORS, so preflights of allowed origins still work.
    app.add_middleware(Guards, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Browser apps (playgrounds, web UIs) on other origins; preflights answered here.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-mlxtg-cache"],
        )
    accepting = Depends(refuse_while_draining)
    app.include_router(openai_router, dependencies=[accepting, Depends(require_key)])
    app.include_router(responses_router, dependencies=[accepting, Depends(require_key)])
    app.include_router(tokenize_router, dependencies=[accepting, Depends(require_key)])
    openapi.install(app, dependencies=[Depends(require_key)])
    # Its own auth: x-api-key or Bearer.
    app.include_router(anthropic_router, dependencies=[accepting])
    app.include_router(_admin_router(), dependencies=[Depends(require_key)])
    ui.install(app)  # the page itself is open: it holds no data, its calls take the key

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(client: Client) -> JSONResponse:
        """Readiness: not draining, the supervisor answers and some model is loaded."""
        if app.state.drain.active:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            status = (await client.control(ControlOp.STATUS, timeout=2.0)).data
        except Unavailable as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
        loaded = [m["name"] for m in status["models"] if m["state"] == "loaded"]
        if not loaded:
            return JSONResponse({"status": "loading", "models": []}, status_code=503)
        return JSONResponse({"status": "ready", "models": loaded})

    @app.get("/metrics")
    async def metrics(client: Client, metrics: Metrics) -> Response:
        extra = b""
        with contextlib.suppress(Unavailable):
            extra = _supervisor_metrics((await client.control(ControlOp.STATUS, timeout=2.0)).data)
        return Response(metrics.render(extra), media_type="text/plain; version=0.0.4")

    return app


def _admin_router() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/v1/models")
    async def models(client: Client) -> dict[str, Any]:
        status = (await client.control(ControlOp.STATUS)).data
        return {"object": "list", "data": [_model_entry(m) for m in status["models"]]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str, client: Client) -> dict[str, Any]:
        status = (await client.control(ControlOp.STATUS)).data
        for m in status["models"]:
            if m["name"] == model_id:
                return _model_entry(m)
        served = ", ".join(m["name"] for m in status["models"])
        raise NotFound(
            f"The model '{model_id}' does not exist; this server serves: {served}",
            param="model",
            code="model_not_found",
        )

    @router.get("/admin/status")
    async def admin_status(client: Client, metrics: Metrics) -> dict[str, Any]:
        data = (await client.control(ControlOp.STATUS)).data
        data["gateway"] = {
            "pid": os.getpid(),
            # The clock the workers' timestamps (stats.last_step) compare to: idle times.
            "time": time.time(),
            # This gateway's last prompt cache misses, with the worker's reason.
            "cache_misses": metrics.recent_misses(),
        }
        return data

    @router.post("/admin/evict", dependencies=[Depends(require_json)])
    async def admin_evict(client: Client, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return _reply(await client.control(ControlOp.EVICT, {"model": (body or {}).get("model")}))

    @router.post("/admin/load", dependencies=[Depends(require_json)])
    async def admin_load(client: Client, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("model"):
            raise BadRequest("model is required", param="model")
        return _reply(await client.control(ControlOp.LOAD, {"model": body["model"]}, timeout=10.0))

    @router.get("/admin/cache")
    async def admin_cache(client: Client) -> dict[str, Any]:
        return _reply(await client.control(ControlOp.CACHE_STATS))

    @router.post("/admin/cache/clear", dependencies=[Depends(require_json)])
    async def admin_cache_clear(
        client: Client, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return _reply(
            await client.control(
                ControlOp.CACHE_CLEAR, {"model": (body or {}).get("model")}, timeout=30.0
            )
        )

    return router


def _model_entry(m: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI model object, with the context length under vLLM's name too."""
    return {
        "id": m["name"],
        "object": "model",
        "created": m.get("created", 0),
        "owned_by": "mlxtg",
        "state": m["state"],
        "context_length": m.get("context_length"),
        "max_model_len": m.get("context_length"),
    }


def _reply(reply: Any) -> dict[str, Any]:
    if not reply.ok:
        raise BadRequest(reply.error or "control request failed")
    return dict(reply.data)


def _supervisor_metrics(status: dict[str, Any]) -> bytes:
    """Per-model gauges from the supervisor's status, in Prometheus text format."""
    lines = []
    for m in status.get("models", []):
        name = m["name"]
        lines.append(f'mlxtg_model_loaded{{model="{name}"}} {1 if m["state"] == "loaded" else 0}')
        stats = (m.get("worker") or {}).get("stats") or {}
        for key in ("running", "queued", "tokens_generated", "prompt_tokens_computed", "kv_bytes"):
            if key in stats:
                lines.append(f'mlxtg_worker_{key}{{model="{name}"}} {stats[key]}')
    for key, value in status.get("counters", {}).items():
        lines.append(f"mlxtg_{key}_total {value}")
    return ("\n".join(lines) + "\n").encode() if lines else b""
