"""The FastAPI application of the ingress: routes, error handlers, body-size limit, health and metrics."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from orchestrator.api import openai, sessions
from orchestrator.api.errors import install_error_handlers
from orchestrator.api.limits import BodySizeLimit
from orchestrator.api.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="specfleet", version="0.1.0",
                  description="OpenAI-compatible serving with DFlash speculative decoding and session routing")
    app.state.specfleet = state
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(sessions.router)

    @app.get("/health")
    async def health():  # open: no key needed
        st: ServerState = app.state.specfleet
        fleet = st.fleet.view().to_dict()  # replicas expected / live, capacity, nodes live / lost
        status = {"starting": "ok", "unavailable": "unavailable"}.get(fleet["status"], fleet["status"])
        if st.draining:
            status = "draining"
        return JSONResponse({"status": status, "in_flight": st.in_flight, **{k: fleet[k] for k in
                             ("replicas", "capacity", "nodes")}},
                            status_code=503 if status in ("draining", "unavailable") else 200)

    @app.get("/metrics")
    async def metrics():  # open: counters only, labelled by replica / node / reason / endpoint (no session data)
        st: ServerState = app.state.specfleet
        st.metrics.fleet(st.fleet.view())
        data, ctype = st.metrics.render()
        return Response(data, media_type=ctype)

    app.add_middleware(BodySizeLimit, max_bytes=state.cfg.limits.max_body_bytes)
    return app
