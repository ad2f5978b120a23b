"""Markdown tables from the summary JSONs the evidence benchmarks write (for docs/benchmarks.md and
docs/evidence.md). The kind of summary is read from the file:

* router_compare, trials mode (`kind: router_compare_trials`): goodput / TTFT / TPOT / 429s / OOMs per policy as
  median [min-max] over trials, specfleet / baseline per trial, tau per role per replica per policy;
* router_compare, single run ({policy: summary}): the same columns, one value each;
* never_slower (`kind: never_slower`): goodput per (policy, concurrency), specfleet / max(static) per level;
* validate (`kind: validation`): simulated vs measured goodput per trial and policy, error per policy;
* project_b300 (`kind: projection`): goodput per router and concurrency per case, labelled a projection.

    python -m benchmarks.report runs/compare_specialised/summary.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROLES = ("planner", "coder", "reviewer", "tool_caller")


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_spread(sp: dict | None, digits: int = 2) -> str:
    """median [min–max] (just the value when all trials agree or there is one)."""
    if not sp or sp.get("median") is None:
        return "–"
    if sp["n"] == 1 or sp["min"] == sp["max"]:
        return fmt(sp["median"], digits)
    return f"{fmt(sp['median'], digits)} [{fmt(sp['min'], digits)}–{fmt(sp['max'], digits)}]"


def header(meta: dict | None) -> list[str]:
    if not meta:
        return []
    return [f"Command: `{meta.get('command', '?')}`  ",
            f"{meta.get('started', '?')} – {meta.get('ended', '?')}; {meta.get('machine', '?')}; load average "
            f"{meta.get('loadavg_start', '?')} at the start, {meta.get('loadavg_end', '?')} at the end; commit "
            f"{meta.get('commit', '?')}", ""]


def compare_tables(summary: dict) -> str:
    """Trials mode of router_compare (or a single run's {policy: summary}, shown as one trial)."""
    if summary.get("kind") != "router_compare_trials":  # a single run: {policy: summary}
        from benchmarks.trials import aggregate

        first = next(iter(summary.values()), {})
        summary = {"kind": "router_compare_trials", "trials": [{"seed": None, "policies": summary}],
                   "seeds": "(one trace)", "concurrency": first.get("concurrency", "?"),
                   "baseline_spec": first.get("baseline_spec", "?"), **aggregate([{"policies": summary}])}
    pols = summary["policies"]
    ratios = summary.get("ratios", {})
    lines = header(summary.get("meta"))
    if summary.get("substituted_drafters"):
        lines += [f"**Smoke run: drafters substituted** {summary['substituted_drafters']}: not a measurement.", ""]
    n = len(summary.get("trials", []))
    lines += [f"{n} trial(s), seeds {summary.get('seeds', '?')}, concurrency {summary.get('concurrency', '?')}, "
              f"baselines' speculation: {summary.get('baseline_spec', '?')}; median [min–max] over trials.", "",
              "| policy | goodput tok/s | specfleet / it | TTFT p50 / p99 s | TPOT p50 / p99 ms "
              "| p99 TPOT specfleet / it | 429s | OOM | errors | failed runs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p, a in pols.items():
        r = ratios.get(f"specfleet/{p}", {})
        lines.append(
            f"| {p} | {fmt_spread(a['goodput_tps'])} | {fmt_spread(r.get('goodput')) if r else '—'} | "
            f"{fmt_spread(a['ttft_p50_s'], 3)} / {fmt_spread(a['ttft_p99_s'], 3)} | "
            f"{fmt_spread(a['tpot_p50_ms'], 1)} / {fmt_spread(a['tpot_p99_ms'], 1)} | "
            f"{fmt_spread(r.get('tpot_p99')) if r else '—'} | {fmt_spread(a['rejected_429'], 0)} | "
            f"{fmt_spread(a['oom_events'], 0)} | {fmt_spread(a['errors'], 0)} | {a.get('failed', 0)} |")
    roles = sorted({role for a in pols.values() for reps in a["tau_by_replica_role"].values() for role in reps},
                   key=lambda r: (ROLES.index(r) if r in ROLES else 99, r))
    if roles:
        lines += ["", "tau (tokens per target pass of speculative turns, pooled per run; median [min–max] over "
                  "trials) per role per replica:", "",
                  "| policy | replica | " + " | ".join(roles) + " |", "|---|---|" + "---|" * len(roles)]
        for p, a in pols.items():
            for lab, reps in a["tau_by_replica_role"].items():
                lines.append(f"| {p} | {lab} | " + " | ".join(fmt_spread(reps.get(role)) for role in roles) + " |")
    return "\n".join(lines)


def never_slower_tables(summary: dict) -> str:
    lines = header(summary.get("meta"))
    if summary.get("substituted_drafters"):
        lines += [f"**Smoke run: drafters substituted** {summary['substituted_drafters']}: not a measurement.", ""]
    pols = summary["policies"]
    lines += [f"One replica, closed-loop clients, seeds {summary.get('seeds')}; goodput tok/s median [min–max] over "
              f"seeds; ratio = specfleet / max(static) per seed; goal >= {summary.get('goal', 0.95)}.", "",
              "| concurrency | " + " | ".join(pols) + " | specfleet / max(static) | goal met (median) |",
              "|---|" + "---|" * len(pols) + "---|---|"]
    for c, lev in summary["levels"].items():
        cells = [fmt_spread(lev["policies"].get(p, {}).get("goodput_tps")) for p in pols]
        ratio = lev.get("ratio")
        met = lev.get("goal_met")
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {fmt_spread(ratio, 3)} | "
                     f"{'–' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines)


def validation_tables(summary: dict) -> str:
    lines = header(summary.get("meta"))
    lines += [f"Step costs: {summary.get('step_costs_source', '?')}; acceptance: "
              f"{summary.get('acceptance_source', '?')}; fitted on {summary.get('fit_on')}: overhead per turn and "
              "contention factor per trial below.", "",
              "| trial | policy | measured tok/s | simulated tok/s | error | held out |", "|---|---|---|---|---|---|"]
    for t in summary["trials"]:
        for r in t["rows"]:
            lines.append(f"| {t['trial']} | {r['policy']} | {fmt(r['measured_goodput_tps'])} | "
                         f"{fmt(r['simulated_goodput_tps'])} | {r['error_pct']:+.1f} % | "
                         f"{'yes' if r['held_out'] else 'no (fit-on)'} |")
    lines += ["", "| policy | median error | max abs error | within goal (<= 15 %) |", "|---|---|---|---|"]
    for p, e in summary["by_policy"].items():
        lines.append(f"| {p} | {e['median_error_pct']:+.1f} % | {e['max_abs_error_pct']:.1f} % | "
                     f"{'yes' if e['within_goal'] else '**no**'} |")
    for t in summary["trials"]:
        lines.append(f"\n{t['trial']}: overhead {t['overhead_s'] * 1e3:.0f} ms per turn, contention factor "
                     f"{t['contention_factor']:.3f}")
    return "\n".join(lines)


def projection_tables(summary: dict) -> str:
    lines = header(summary.get("meta"))
    lines += [f"**{summary.get('statement', 'Projection')}**", ""]
    for case, data in summary["cases"].items():
        levels = sorted(data["levels"], key=int)
        routers = list(next(iter(data["levels"].values()))["routers"]) if levels else []
        lines += [f"{case} (KV {data['kv_tokens_per_replica']} tokens per replica)", "",
                  "| sessions | " + " | ".join(f"{r} tok/s" for r in routers) + " | specfleet / pow2 | "
                  "specfleet / consistent_hash |", "|---|" + "---|" * (len(routers) + 2)]
        for c in levels:
            lev = data["levels"][c]
            lines.append(f"| {c} | " + " | ".join(fmt(lev['routers'][r]['goodput_tps'], 0) for r in routers)
                         + f" | {fmt(lev['ratio'].get('pow2'), 3)} | {fmt(lev['ratio'].get('consistent_hash'), 3)} |")
        lines.append("")
    return "\n".join(lines)


def render(summary: dict) -> str:
    kind = summary.get("kind")
    if kind == "never_slower":
        return never_slower_tables(summary)
    if kind == "validation":
        return validation_tables(summary)
    if kind == "projection":
        return projection_tables(summary)
    return compare_tables(summary)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary", nargs="+", help="summary JSON(s)")
    a = ap.parse_args(argv)
    try:
        for path in a.summary:
            try:
                summary = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                ap.error(f"{path}: {exc}")
            print(f"<!-- {path} -->")
            print(render(summary))
            print()
    except BrokenPipeError:  # `| head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
