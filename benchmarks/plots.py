"""PNG plots for docs/ from the evidence benchmarks' outputs.

* `--compare DIR` (router_compare): goodput per policy with its spread over trials, tau per role per replica per
  policy, KV headroom over time (the first trial), and the older tau-per-role-by-router bars;
* `--never-slower DIR` (never_slower): goodput vs concurrency per policy with min-max bars, and specfleet /
  max(static) per concurrency against the 0.95 goal;
* `--projection JSON` (project_b300): simulated goodput vs concurrency per router, titled as a projection.

    python -m benchmarks.plots --compare runs/compare_specialised --never-slower runs/never_slower \
        --projection runs/b300_specialised.json --out docs --tag real
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

POLICIES = ("specfleet", "pow2", "consistent_hash")
COLORS = {"specfleet": "tab:green", "pow2": "tab:blue", "consistent_hash": "tab:orange", "ar": "tab:gray",
          "dflash_b16": "tab:purple"}
ROLE_ORDER = ("planner", "coder", "reviewer", "tool_caller")


def _err(sp: dict) -> tuple[float, float, float]:
    """(median, median - min, max - median) of a trials.spread dict (zeros where missing)."""
    if not sp or sp.get("median") is None:
        return 0.0, 0.0, 0.0
    return sp["median"], sp["median"] - sp["min"], sp["max"] - sp["median"]


def _when(summary: dict) -> str:
    m = summary.get("meta") or {}
    return f"{m.get('started', '?')[:16]}, load {m.get('loadavg_start', '?').split(' ')[0]}"


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _grouped_bars(ax, groups: list[str], series: dict[str, tuple[list[float], list[list[float]] | None]]) -> None:
    """One bar per series in each group, side by side (colour per series name), x ticks at the groups' centres;
    series: {name: (heights, yerr or None)}."""
    width = 0.8 / max(1, len(series))
    for i, (name, (heights, yerr)) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(groups))], heights, width, yerr=yerr, capsize=3, label=name,
               color=COLORS.get(name))
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], groups)


def goodput_spread(summary: dict, out: Path, title: str) -> Path:
    """Bars: goodput per policy, median over trials, whiskers min-max; specfleet / it above each baseline."""
    pols = list(summary["policies"])
    meds = [_err(summary["policies"][p]["goodput_tps"]) for p in pols]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(pols, [m[0] for m in meds], yerr=[[m[1] for m in meds], [m[2] for m in meds]], capsize=6,
           color=[COLORS.get(p, "tab:gray") for p in pols])
    for i, p in enumerate(pols):
        r = summary.get("ratios", {}).get(f"specfleet/{p}", {}).get("goodput", {})
        if r.get("median") is not None:
            ax.annotate(f"specfleet / it: {r['median']:.2f}x", (i, meds[i][0] + meds[i][2]), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    n = max((summary["policies"][p]["goodput_tps"]["n"] for p in pols), default=0)
    ax.set_ylabel("goodput (tokens/s): median, min-max")
    ax.set_title(f"{title}\n{n} trial(s); {_when(summary)}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def tau_by_replica_role(summary: dict, out: Path, title: str) -> Path:
    """One panel per replica: tau per role (median over trials, min-max whiskers), one bar per policy."""
    pols = list(summary["policies"])
    taus = {p: summary["policies"][p]["tau_by_replica_role"] for p in pols}
    reps = sorted({lab for p in pols for lab in taus[p]})
    roles = sorted({r for p in pols for lab in reps for r in taus[p].get(lab, {})},
                   key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 99, r))
    fig, axes = plt.subplots(1, max(1, len(reps)), figsize=(5.5 * max(1, len(reps)), 4), squeeze=False, sharey=True)
    for ax, lab in zip(axes[0], reps or ["(no speculative turns)"]):
        cells = {p: [_err(taus[p].get(lab, {}).get(r)) for r in roles] for p in pols}
        _grouped_bars(ax, roles, {p: ([c[0] for c in cs], [[c[1] for c in cs], [c[2] for c in cs]])
                                  for p, cs in cells.items()})
        ax.set_title(lab, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("tau (tokens per target pass)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title} ({_when(summary)})", fontsize=10)
    return _save(fig, out)


def _spread_line(ax, xs: list[int], cells: list[tuple[float, float, float]], **kw) -> None:
    """Medians over xs with min-max bars (cells: _err triples)."""
    ax.errorbar(xs, [c[0] for c in cells], yerr=[[c[1] for c in cells], [c[2] for c in cells]], marker="o",
                capsize=4, **kw)


def _concurrency_axes(ax, xs: list[int], ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent agent sessions (closed loop)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def never_slower_curve(summary: dict, out: Path, title: str) -> Path:
    """Left: goodput vs concurrency per policy (median, min-max bars). Right: specfleet / max(static) per
    concurrency (median, min-max) against the goal."""
    levels = sorted(summary["levels"], key=int)
    xs = [int(c) for c in levels]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in summary.get("policies", []):
        cells = [_err(summary["levels"][c]["policies"].get(p, {}).get("goodput_tps")) for c in levels]
        _spread_line(ax, xs, cells, label=p, color=COLORS.get(p))
    _concurrency_axes(ax, xs, "goodput (tokens/s)")
    _spread_line(ax2, xs, [_err(summary["levels"][c].get("ratio")) for c in levels], color=COLORS["specfleet"],
                 label="specfleet / max(static)")
    ax2.axhline(summary.get("goal", 0.95), color="tab:red", ls="--", label=f"goal {summary.get('goal', 0.95)}")
    ax2.axhline(1.0, color="black", lw=0.6)
    _concurrency_axes(ax2, xs, "specfleet / best static")
    fig.suptitle(f"{title} ({len(summary.get('seeds', []))} seed(s); {_when(summary)})", fontsize=10)
    return _save(fig, out)


def load_summary(path: Path) -> dict:
    """A summary JSON, or the summary.json of an output folder."""
    path = path / "summary.json" if path.is_dir() else path
    return json.loads(path.read_text())


def goodput_vs_concurrency(projection: dict, out: Path, title_suffix: str = "") -> Path:
    cases = projection["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, (case, data) in zip(axes[0], cases.items()):
        levels = sorted(data["levels"], key=int)
        for pol in POLICIES:
            ax.plot([int(c) for c in levels], [data["levels"][c]["routers"][pol]["goodput_tps"] for c in levels],
                    marker="o", label=pol, color=COLORS[pol])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent agent sessions")
        ax.set_ylabel("goodput (tokens/s)")
        ax.set_title(case)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"PROJECTION (simulated, not measured): DGX B300 goodput by router{title_suffix}")
    return _save(fig, out)


def tau_by_role(summaries: dict, out: Path, title: str) -> Path:
    roles = sorted({r for s in summaries.values() for r in s.get("tau_by_role", {})})
    fig, ax = plt.subplots(figsize=(7, 4))
    _grouped_bars(ax, roles, {pol: ([s["tau_by_role"].get(r, 0) for r in roles], None) for pol, s in summaries.items()})
    ax.set_ylabel("tau (tokens per target pass, speculative turns)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def headroom_over_time(run: Path, out: Path, title: str) -> Path:
    pols = [p for p in POLICIES if (run / f"{p}.metrics.jsonl").exists()]
    fig, axes = plt.subplots(1, len(pols), figsize=(5 * len(pols), 3.6), squeeze=False, sharey=True)
    for ax, pol in zip(axes[0], pols):
        rows = [json.loads(ln) for ln in (run / f"{pol}.metrics.jsonl").read_text().splitlines() if ln]
        reps = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict)})
        kv_total = {k: max((r[k].get("kv_total_tokens", 0) for r in rows if k in r), default=0) for k in reps}
        for k in sorted(reps, key=lambda k: -kv_total[k]):
            pts = [(r["t"], r[k]["kv_free_tokens"] / r[k]["kv_total_tokens"]) for r in rows
                   if k in r and r[k].get("kv_total_tokens")]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=f"{k} ({int(kv_total[k])} tok)")
        ax.set_title(pol)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("free KV (%)")
    fig.suptitle(title)
    return _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", help="router_compare output folder (single run or trials)")
    ap.add_argument("--never-slower", help="never_slower output folder (or its summary.json)")
    ap.add_argument("--projection", help="project_b300 JSON")
    ap.add_argument("--tag", default="real", help="file-name tag for the compare / never-slower plots")
    ap.add_argument("--out", default="docs")
    a = ap.parse_args(argv)
    if not (a.compare or a.never_slower or a.projection):
        ap.error("nothing to plot: give --compare, --never-slower and/or --projection")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    try:
        if a.compare:
            run = Path(a.compare)
            summary = load_summary(run)
            if summary.get("kind") == "router_compare_trials":
                first = run / f"seed{summary['trials'][0]['seed']}"
            else:  # a single run: {policy: summary}, shown as one trial
                from benchmarks.trials import aggregate

                first, summary = run, {"kind": "router_compare_trials", **aggregate([{"policies": summary}])}
            made.append(goodput_spread(summary, out / f"router_goodput_{a.tag}.png", f"goodput by router ({a.tag})"))
            made.append(tau_by_replica_role(summary, out / f"router_tau_by_replica_{a.tag}.png",
                                            f"tau per role per replica by router ({a.tag})"))
            per_policy = {p: json.loads((first / f"{p}.summary.json").read_text()) for p in POLICIES
                          if (first / f"{p}.summary.json").exists()}
            if per_policy:
                made.append(tau_by_role(per_policy, out / f"router_tau_by_role_{a.tag}.png",
                                        f"tau per role by router ({a.tag})"))
                made.append(headroom_over_time(first, out / f"router_headroom_{a.tag}.png",
                                               f"KV headroom over time ({a.tag})"))
        if a.never_slower:
            ns = load_summary(Path(a.never_slower))
            made.append(never_slower_curve(ns, out / f"never_slower_{a.tag}.png",
                                           f"never slower: one replica, goodput by policy ({a.tag})"))
        if a.projection:
            proj = json.loads(Path(a.projection).read_text())
            name = Path(a.projection).stem
            made.append(goodput_vs_concurrency(proj, out / f"{name}_goodput.png"))
    except (OSError, KeyError, ValueError) as exc:
        ap.error(f"cannot plot: {type(exc).__name__}: {exc}")
    for p in made:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
