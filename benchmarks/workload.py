"""Seeded, replayable multi-agent workload: teams of agents running multi-turn sessions.

Each team shares a task; each agent (planner / coder / reviewer / tool_caller) is one session
with its own system prompt and prompt style, so drafters accept differently per role (code and
JSON are predictable, free-form planning less so). A session's prompt grows turn by turn (its
system prompt + all earlier turns and answers: a growing shared prefix). Teams arrive as a
Poisson process; inside a session, turn k+1 is sent `think_s` after turn k's answer (closed loop).

    python -m benchmarks.workload --teams 12 --rate 0.5 --seed 0 --out runs/trace.jsonl

Trace format (JSONL): a {"kind": "header"} line with the generator's config, then per session a
{"kind": "session", session_id, team, role, start_s, system} line followed by its
{"kind": "turn", session_id, turn, user, max_tokens, think_s} lines.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workers.training.prompts import AGENT_SYSTEM

ROLES = ("planner", "coder", "reviewer", "tool_caller")

TASKS = [
    ("parse_csv", "read a CSV file and return the sum of one numeric column"),
    ("dedupe", "remove duplicate entries from a list while keeping their order"),
    ("word_count", "count how often each word occurs in a text file"),
    ("retry", "call a flaky HTTP endpoint with exponential backoff"),
    ("lru_cache", "implement a least-recently-used cache with a fixed capacity"),
    ("merge_intervals", "merge overlapping time intervals in a schedule"),
    ("validate_email", "check whether a string is a valid email address"),
    ("rate_limiter", "limit how many requests each user may send per minute"),
    ("flatten", "flatten a nested list of arbitrary depth"),
    ("top_k", "return the k most frequent items of a stream"),
    ("json_diff", "report the keys that differ between two JSON documents"),
    ("chunk_file", "split a large log file into chunks of at most N lines"),
    ("median", "compute the running median of a stream of numbers"),
    ("slugify", "turn an article title into a URL slug"),
    ("matrix", "multiply two matrices given as lists of lists"),
    ("binary_search", "find the first position of a value in a sorted list"),
]
TOOLS = ["search_docs", "run_tests", "read_file", "write_file", "open_issue", "get_weather", "query_db"]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Seoul", "Perth"]

SYSTEM = AGENT_SYSTEM  # role -> system prompt: the one set the drafter is also trained on
FOLLOW_UPS = {
    "planner": ["What is the next step?", "Which step is the riskiest, and why?", "Shorten the plan to three steps."],
    "coder": ["Add type hints and a docstring.", "Add error handling for bad input.",
              "Write a unit test for it with pytest.", "Make it faster."],
    "reviewer": ["Which problem matters most?", "Suggest a fix for the first problem.", "Is the code thread-safe?"],
    "tool_caller": ["Now call {tool} for {city}.", "Call {tool} with the file name from the previous result.",
                    "Call {tool} again with limit 10."],
}


@dataclass
class WorkloadConfig:
    teams: int = 12
    rate: float = 0.5  # team arrivals per second (Poisson)
    roles: dict[str, float] = field(default_factory=lambda: {r: 1.0 for r in ROLES})  # agent mix (weights)
    agents_per_team: int = 3
    turns: tuple[int, int] = (2, 4)  # inclusive range of turns per session
    max_tokens: dict[str, int] = field(
        default_factory=lambda: {"planner": 96, "coder": 128, "reviewer": 96, "tool_caller": 48})
    think_s: tuple[float, float] = (0.2, 1.0)  # pause between an answer and the next turn
    seed: int = 0


@dataclass
class TurnTrace:
    user: str
    max_tokens: int
    think_s: float


@dataclass
class SessionTrace:
    session_id: str
    team: str
    role: str
    start_s: float
    system: str
    turns: list[TurnTrace]


def _first_turn(role: str, task: tuple[str, str], rng: random.Random) -> str:
    name, what = task
    if role == "planner":
        return f"Task: {what}. Plan the work for the team."
    if role == "coder":
        return f"Write a Python function `{name}` that does this: {what}."
    if role == "reviewer":
        return (f"Review this function:\n```python\ndef {name}(data):\n    result = []\n    for item in data:\n"
                f"        if item not in result:\n            result.append(item)\n    return result\n```\n"
                f"It is meant to {what}.")
    tool, city = rng.choice(TOOLS), rng.choice(CITIES)
    return f"Goal: {what}. First call the tool {tool} for the project in {city}."


def generate(cfg: WorkloadConfig) -> list[SessionTrace]:
    rng = random.Random(cfg.seed)
    roles = [r for r, w in cfg.roles.items() if w > 0]
    weights = [cfg.roles[r] for r in roles]
    sessions: list[SessionTrace] = []
    t = 0.0
    for team_i in range(cfg.teams):
        t += rng.expovariate(cfg.rate) if cfg.rate > 0 else 0.0
        team = f"team-{cfg.seed}-{team_i}"
        task = rng.choice(TASKS)
        for agent_i in range(cfg.agents_per_team):
            role = rng.choices(roles, weights)[0]
            n_turns = rng.randint(*cfg.turns)
            turns = [TurnTrace(_first_turn(role, task, rng), cfg.max_tokens[role], 0.0)]
            for _ in range(n_turns - 1):
                text = rng.choice(FOLLOW_UPS[role]).format(tool=rng.choice(TOOLS), city=rng.choice(CITIES))
                turns.append(TurnTrace(text, cfg.max_tokens[role], round(rng.uniform(*cfg.think_s), 3)))
            sessions.append(SessionTrace(f"{team}-a{agent_i}-{role}", team, role,
                                         round(t + 0.05 * agent_i, 4), SYSTEM[role], turns))
    return sessions


def save(path: str | Path, cfg: WorkloadConfig, sessions: list[SessionTrace]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        f.write(json.dumps({"kind": "header", "config": asdict(cfg)}) + "\n")
        for s in sessions:
            f.write(json.dumps({"kind": "session", "session_id": s.session_id, "team": s.team, "role": s.role,
                                "start_s": s.start_s, "system": s.system}) + "\n")
            for i, turn in enumerate(s.turns):
                f.write(json.dumps({"kind": "turn", "session_id": s.session_id, "turn": i, **asdict(turn)}) + "\n")


def load(path: str | Path) -> tuple[dict, list[SessionTrace]]:
    header: dict = {}
    by_id: dict[str, SessionTrace] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        if d["kind"] == "header":
            header = d["config"]
        elif d["kind"] == "session":
            by_id[d["session_id"]] = SessionTrace(d["session_id"], d["team"], d["role"], d["start_s"], d["system"], [])
        elif d["kind"] == "turn":
            by_id[d["session_id"]].turns.append(TurnTrace(d["user"], d["max_tokens"], d["think_s"]))
    return header, sorted(by_id.values(), key=lambda s: s.start_s)


def add_workload_args(ap: argparse.ArgumentParser, seed: bool = True) -> None:
    """The workload's flags (shared by this command, router_compare and never_slower)."""
    ap.add_argument("--teams", type=int, default=12)
    ap.add_argument("--rate", type=float, default=0.5, help="team arrivals per second")
    ap.add_argument("--agents-per-team", type=int, default=3)
    ap.add_argument("--turns", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    ap.add_argument("--mix", default="planner=1,coder=1,reviewer=1,tool_caller=1", help="role=weight,...")
    ap.add_argument("--max-tokens-scale", type=float, default=1.0)
    ap.add_argument("--think", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"),
                    help="seconds between an answer and the session's next turn")
    if seed:
        ap.add_argument("--seed", type=int, default=0)


def config_from_args(a: argparse.Namespace, seed: int | None = None, teams: int | None = None) -> WorkloadConfig:
    """WorkloadConfig from add_workload_args' flags (``seed`` / ``teams`` override theirs); ValueError on a bad
    --mix or range."""
    try:
        mix = {k.strip(): float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
    except ValueError:
        raise ValueError(f"--mix must be role=weight,...; got {a.mix!r}") from None
    bad = set(mix) - set(ROLES)
    if bad:
        raise ValueError(f"unknown roles {sorted(bad)}; known: {', '.join(ROLES)}")
    if not any(w > 0 for w in mix.values()):
        raise ValueError("--mix needs at least one role with a positive weight")
    lo, hi = a.turns
    if not 1 <= lo <= hi:
        raise ValueError(f"--turns needs 1 <= MIN <= MAX, got {lo} {hi}")
    t0, t1 = a.think
    if not 0 <= t0 <= t1:
        raise ValueError(f"--think needs 0 <= MIN <= MAX, got {t0} {t1}")
    cfg = WorkloadConfig(teams=teams if teams is not None else a.teams, rate=a.rate, roles=mix,
                         agents_per_team=a.agents_per_team, turns=(lo, hi), think_s=(t0, t1),
                         seed=seed if seed is not None else getattr(a, "seed", 0))
    cfg.max_tokens = {k: max(1, int(v * a.max_tokens_scale)) for k, v in cfg.max_tokens.items()}
    return cfg


def teams_for(sessions: int, agents_per_team: int) -> int:
    """Teams that give at least ``sessions`` sessions."""
    return max(1, -(-sessions // max(1, agents_per_team)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
    except ValueError as exc:
        ap.error(str(exc))
    sessions = generate(cfg)
    save(a.out, cfg, sessions)
    n_turns = sum(len(s.turns) for s in sessions)
    print(f"wrote {a.out}: {len(sessions)} sessions, {n_turns} turns, last team at {sessions[-1].start_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
