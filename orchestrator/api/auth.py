"""API keys as `Authorization: Bearer <key>`; constant-time comparison; keys are never logged or stored —
a caller is identified by a key fingerprint (the owner of its sessions)."""
from __future__ import annotations

import hashlib
import hmac

from orchestrator.api.errors import APIError

ANONYMOUS = "anonymous"


def fingerprint(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


class KeyRing:
    def __init__(self, keys: list[str]):
        # compare fixed-length digests so neither the length nor the content leaks through timing
        self._digests = [(hashlib.sha256(k.encode("utf-8")).digest(), fingerprint(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:  # never print the keys
        return f"KeyRing({len(self._digests)} keys)"

    def authenticate(self, authorization: str | None) -> str:
        """Owner id for an Authorization header value; raises 401 APIError."""
        if not self._digests:
            return ANONYMOUS
        if not authorization:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.encode("utf-8", errors="replace")).digest()
        owner = None
        for known, fp in self._digests:  # no early exit: same work whichever key matches
            if hmac.compare_digest(digest, known):
                owner = fp
        if owner is None:
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return owner
