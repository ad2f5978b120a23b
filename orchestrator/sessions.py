"""Durable session registry (SQLite): sessions, owners, teams, per-turn routing and acceptance stats.

A session belongs to the API key that created it (stored as a key fingerprint, never the key);
every read or write takes the caller's owner id and treats a session of another owner exactly like
a missing one. Each write is committed at once (WAL journal), so a restart of the ingress or of
the whole `specfleet serve` process loses nothing that was acknowledged.
"""
from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("specfleet.sessions")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, role TEXT, team TEXT, metadata TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, target_passes INTEGER NOT NULL DEFAULT 0,
    tau_ewma REAL, spec_enabled INTEGER, spec_block INTEGER, last_replica TEXT, last_route TEXT
);
CREATE INDEX IF NOT EXISTS sessions_owner_team ON sessions(owner, team);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL, idx INTEGER NOT NULL, at REAL NOT NULL, replica TEXT, route TEXT,
    spec_enabled INTEGER, spec_block INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER,
    target_passes INTEGER, finish_reason TEXT, constrained TEXT, tool_calls INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, idx)
);
"""
# columns added after the first release: (table, column, declaration) for ALTER TABLE on an older file
_ADDED_COLUMNS = [("turns", "constrained", "TEXT"), ("turns", "tool_calls", "INTEGER NOT NULL DEFAULT 0")]
_EWMA = 0.3
MAX_HISTORY = 100  # turns returned in a session's replica history


class SessionRegistry:
    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.text_factory = _text  # a row written by an older version with bad bytes still reads
        self._lock = threading.Lock()
        with self._lock:
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            for table, col, decl in _ADDED_COLUMNS:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if col not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ sessions
    def create(self, owner: str, role: str | None, team: str | None, metadata: dict[str, Any]) -> dict:
        sid = "sess_" + secrets.token_hex(12)
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions (id, owner, role, team, metadata, created, updated) VALUES (?,?,?,?,?,?,?)",
                (sid, owner, role, team, json.dumps(metadata), now, now),
            )
        return self.get(owner, sid)  # type: ignore[return-value]

    def count(self, owner: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM sessions WHERE owner=?", (owner,)).fetchone()[0]

    def get(self, owner: str, sid: str, history: bool = True) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id=? AND owner=?", (sid, owner)).fetchone()
            if row is None:
                return None
            turns = self._db.execute(
                "SELECT * FROM turns WHERE session_id=? ORDER BY idx DESC LIMIT ?", (sid, MAX_HISTORY)
            ).fetchall() if history else []
            per_replica = self._db.execute(
                "SELECT replica, COUNT(*) AS turns, SUM(completion_tokens) AS tokens, SUM(target_passes) AS passes"
                " FROM turns WHERE session_id=? GROUP BY replica ORDER BY replica", (sid,)
            ).fetchall() if history else []
            tools = self._db.execute(  # tool calls; acceptance of constrained vs free turns (speculative ones)
                "SELECT COALESCE(SUM(tool_calls), 0) AS calls, COUNT(constrained) AS constrained,"
                " SUM(CASE WHEN constrained IS NOT NULL AND spec_enabled=1 THEN completion_tokens END) AS c_tok,"
                " SUM(CASE WHEN constrained IS NOT NULL AND spec_enabled=1 THEN target_passes END) AS c_pass,"
                " SUM(CASE WHEN constrained IS NULL AND spec_enabled=1 THEN completion_tokens END) AS f_tok,"
                " SUM(CASE WHEN constrained IS NULL AND spec_enabled=1 THEN target_passes END) AS f_pass"
                " FROM turns WHERE session_id=?", (sid,)
            ).fetchone()
        out = _session_dict(row)
        out["tool_calls"], out["constrained_turns"] = tools["calls"], tools["constrained"]
        out["tau_constrained"] = tools["c_tok"] / tools["c_pass"] if tools["c_pass"] else None
        out["tau_unconstrained"] = tools["f_tok"] / tools["f_pass"] if tools["f_pass"] else None
        if history:
            out["replica_history"] = [_turn_dict(t) for t in reversed(turns)]
            out["acceptance_by_replica"] = {
                r["replica"]: {
                    "turns": r["turns"], "completion_tokens": r["tokens"] or 0, "target_passes": r["passes"] or 0,
                    "tau": (r["tokens"] / r["passes"]) if r["passes"] else None,
                }
                for r in per_replica if r["replica"]
            }
        return out

    def list(self, owner: str, team: str | None = None, limit: int = 100) -> list[dict]:
        q, args = "SELECT * FROM sessions WHERE owner=?", [owner]
        if team is not None:
            q += " AND team=?"
            args.append(team)
        q += " ORDER BY created LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [_session_dict(r) for r in rows]  # never raises for one row's content (see _session_dict)

    def delete(self, owner: str, sid: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id=? AND owner=?", (sid, owner))
            if cur.rowcount:
                self._db.execute("DELETE FROM turns WHERE session_id=?", (sid,))
            return cur.rowcount > 0

    def exists(self, owner: str, sid: str) -> dict | None:
        """The session row without history (used on every turn), or None."""
        return self.get(owner, sid, history=False)

    # ------------------------------------------------------------------ turns
    def record_turn(
        self, sid: str, *, replica: str | None, route: str | None, spec: dict | None,
        prompt_tokens: int, completion_tokens: int, target_passes: int, finish_reason: str | None,
        constrained: str | None = None, tool_calls: int = 0,
    ) -> None:
        """constrained: the grammar kind of a structured-output / tool turn (None = free text)."""
        now = time.time()
        spec_on = None if spec is None else int(bool(spec.get("enabled")))
        block = None if spec is None else spec.get("block_size")
        tau = completion_tokens / target_passes if target_passes else None
        with self._lock:
            row = self._db.execute("SELECT turns, tau_ewma FROM sessions WHERE id=?", (sid,)).fetchone()
            if row is None:  # deleted while the turn ran: nothing to record
                return
            ewma = row["tau_ewma"]
            if tau is not None and spec_on:
                ewma = tau if ewma is None else (1 - _EWMA) * ewma + _EWMA * tau
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO turns (session_id, idx, at, replica, route, spec_enabled, spec_block, prompt_tokens,"
                " completion_tokens, target_passes, finish_reason, constrained, tool_calls)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (sid, row["turns"], now, replica, route, spec_on, block, prompt_tokens, completion_tokens,
                 target_passes, finish_reason, constrained, int(tool_calls)),
            )
            self._db.execute(
                "UPDATE sessions SET turns=turns+1, prompt_tokens=prompt_tokens+?, completion_tokens="
                "completion_tokens+?, target_passes=target_passes+?, tau_ewma=?, spec_enabled=?, spec_block=?,"
                " last_replica=?, last_route=?, updated=? WHERE id=?",
                (prompt_tokens, completion_tokens, target_passes, ewma, spec_on, block, replica, route, now, sid),
            )
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ teams
    def team(self, owner: str, team: str) -> dict | None:
        with self._lock:
            rows = self._db.execute("SELECT * FROM sessions WHERE owner=? AND team=?", (owner, team)).fetchall()
        if not rows:
            return None
        by_role: dict[str, dict[str, Any]] = {}
        for r in rows:
            agg = by_role.setdefault(clean_text(r["role"] or ""), {"sessions": 0, "turns": 0, "completion_tokens": 0,
                                                        "target_passes": 0})
            agg["sessions"] += 1
            agg["turns"] += r["turns"]
            agg["completion_tokens"] += r["completion_tokens"]
            agg["target_passes"] += r["target_passes"]
        for agg in by_role.values():
            agg["tau"] = agg["completion_tokens"] / agg["target_passes"] if agg["target_passes"] else None
        tokens = sum(r["completion_tokens"] for r in rows)
        passes = sum(r["target_passes"] for r in rows)
        return {
            "object": "team", "id": team, "sessions": len(rows),
            "turns": sum(r["turns"] for r in rows),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": tokens, "target_passes": passes,
            "tau": tokens / passes if passes else None,
            "by_role": by_role,
            "session_ids": [r["id"] for r in rows],
        }


def _text(raw: bytes) -> str:
    """SQLite TEXT -> str: bytes that are not UTF-8 become U+FFFD instead of failing the whole query."""
    return raw.decode("utf-8", "replace")


def clean_text(value: Any) -> Any:
    """`value` with every string (and key) made encodable: lone UTF-16 surrogates, which the edge now refuses but
    an older version stored (`"\\ud800"` in metadata JSON), become U+FFFD, so one such row cannot make a listing,
    a session or a team unreadable (its JSON response would fail to encode)."""
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value) if unencodable(value) else value
    if isinstance(value, dict):
        return {clean_text(k): clean_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_text(v) for v in value]
    return value


def unencodable(s: str) -> bool:
    """True for a str that holds a lone UTF-16 surrogate (cannot be encoded as UTF-8)."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _metadata(raw: Any, sid: str) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        log.warning("session %s: unreadable metadata replaced by {}", sid)
        return {}
    return clean_text(value) if isinstance(value, dict) else {}


def _session_dict(r: sqlite3.Row) -> dict:
    spec = None
    if r["spec_enabled"] is not None:
        spec = {"enabled": bool(r["spec_enabled"]), "block_size": r["spec_block"]}
    return {
        "id": r["id"], "object": "session", "role": clean_text(r["role"]), "team": clean_text(r["team"]),
        "metadata": _metadata(r["metadata"], r["id"]), "created": int(r["created"]), "updated": int(r["updated"]),
        "turns": r["turns"], "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
        "target_passes": r["target_passes"],
        "tau": (r["completion_tokens"] / r["target_passes"]) if r["target_passes"] else None,
        "tau_ewma": r["tau_ewma"], "spec": spec, "last_replica": r["last_replica"], "last_route": r["last_route"],
    }


def _turn_dict(t: sqlite3.Row) -> dict:
    return {
        "turn": t["idx"], "at": t["at"], "replica": t["replica"], "route": t["route"],
        "spec": None if t["spec_enabled"] is None else {"enabled": bool(t["spec_enabled"]), "block_size": t["spec_block"]},
        "prompt_tokens": t["prompt_tokens"], "completion_tokens": t["completion_tokens"],
        "target_passes": t["target_passes"],
        "tau": (t["completion_tokens"] / t["target_passes"]) if t["target_passes"] else None,
        "finish_reason": t["finish_reason"], "constrained": t["constrained"], "tool_calls": t["tool_calls"],
    }
