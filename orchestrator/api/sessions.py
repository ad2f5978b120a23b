"""Session and team endpoints for agent frameworks. A session is visible only to the key that created it:
any other key gets the same 404 as for a session that never existed."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from orchestrator.api.deps import get_state, owner_of
from orchestrator.api.errors import APIError, error_responses, too_many
from orchestrator.api.schemas import SessionCreate
from orchestrator.api.state import ServerState

router = APIRouter()


def _not_found(sid: str) -> APIError:
    return APIError(404, f"session '{sid}' not found", param="session_id", code="session_not_found")


@router.post("/v1/sessions", responses=error_responses(400, 401, 413, 429))
async def create_session(body: SessionCreate, state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    limit = state.cfg.limits.max_sessions_per_key
    if state.registry.count(owner) >= limit:
        raise too_many(f"this API key already has {limit} sessions; delete some first", state.cfg.limits.retry_after_s,
                       code="too_many_sessions")
    return state.registry.create(owner, body.role, body.team, body.metadata)


@router.get("/v1/sessions", responses=error_responses(400, 401))
async def list_sessions(team: str | None = Query(None, max_length=128), limit: int = Query(100, ge=1, le=1000),
                        state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    return {"object": "list", "data": state.registry.list(owner, team=team, limit=limit)}


@router.get("/v1/sessions/{sid}", responses=error_responses(400, 401, 404))
async def get_session(sid: str, state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    s = state.registry.get(owner, sid)
    if s is None:
        raise _not_found(sid)
    return s


@router.delete("/v1/sessions/{sid}", responses=error_responses(400, 401, 404))
async def delete_session(sid: str, state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    if not state.registry.delete(owner, sid):
        raise _not_found(sid)
    state.context_len.pop(sid, None)
    return {"id": sid, "object": "session.deleted", "deleted": True}


@router.get("/v1/teams/{team_id}", responses=error_responses(400, 401, 404))
async def get_team(team_id: str, state: ServerState = Depends(get_state), owner: str = Depends(owner_of)):
    t = state.registry.team(owner, team_id)
    if t is None:
        raise APIError(404, f"team '{team_id}' not found (no sessions of this key carry it)", param="team_id",
                       code="team_not_found")
    return t
