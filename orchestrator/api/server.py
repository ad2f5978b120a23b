"""The FastAPI application of the ingress: routes, error handlers, edge middleware (request counting, header check,
body-size limit), health and metrics, and the published OpenAPI schema (orchestrator/api/contract.py)."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from orchestrator.api import contract, openai, sessions
from orchestrator.api.errors import error_responses, install_error_handlers
from orchestrator.api.limits import BodySizeLimit
from orchestrator.api.middleware import CountResponses, HeaderGuard
from orchestrator.api.state import ServerState

HEALTH_DOC = {200: {"description": "serving: `status` ok or degraded (fewer live replicas than configured)",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
              503: {"description": "`status` draining (shutting down) or unavailable (no live replica)",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}
METRICS_DOC = {200: {"description": "Prometheus text exposition format",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="specfleet", version="0.1.0",
                  description="OpenAI-compatible serving with DFlash speculative decoding and session routing. "
                  "Every error is `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` with the status "
                  "each operation lists.")
    app.state.specfleet = state
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(sessions.router)

    @app.get("/health", responses={**HEALTH_DOC, **error_responses(400)})
    async def health():  # open: no key needed
        st: ServerState = app.state.specfleet
        fleet = st.fleet.view().to_dict()  # replicas expected / live, capacity, nodes live / lost
        status = {"starting": "ok", "unavailable": "unavailable"}.get(fleet["status"], fleet["status"])
        if st.draining:
            status = "draining"
        return JSONResponse({"status": status, "in_flight": st.in_flight, **{k: fleet[k] for k in
                             ("replicas", "capacity", "nodes", "cpu_kernels")}},
                            status_code=503 if status in ("draining", "unavailable") else 200)

    @app.get("/metrics", response_class=Response, responses={**METRICS_DOC, **error_responses(400)})
    async def metrics():  # open: counters only, labelled by replica / node / reason / endpoint (no session data)
        st: ServerState = app.state.specfleet
        st.metrics.fleet(st.fleet.view())
        data, ctype = st.metrics.render()
        return Response(data, media_type=ctype)

    # outermost last: every response is counted, a bad header is refused before the body is read
    app.add_middleware(BodySizeLimit, max_bytes=state.cfg.limits.max_body_bytes)
    app.add_middleware(HeaderGuard)
    app.add_middleware(CountResponses, counter=state.metrics.requests)
    contract.install(app, state)
    return app
