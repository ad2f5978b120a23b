"""FastAPI dependencies: the server state of this app, and the caller's owner id (401 without a valid key)."""
from __future__ import annotations

from fastapi import Request

from orchestrator.api.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.specfleet


def owner_of(request: Request) -> str:
    return request.app.state.specfleet.keys.authenticate(request.headers.get("authorization"))
