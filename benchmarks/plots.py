"""PNG plots for docs/benchmarks.md from router_compare runs and the B300 projection.

    python -m benchmarks.plots --compare runs/compare_real --projection runs/b300.json --out docs --tag real
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

POLICIES = ("specfleet", "pow2", "consistent_hash")
COLORS = {"specfleet": "tab:green", "pow2": "tab:blue", "consistent_hash": "tab:orange"}


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
    fig.suptitle(f"Simulated DGX B300 goodput by router{title_suffix}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def tau_by_role(summaries: dict, out: Path, title: str) -> Path:
    roles = sorted({r for s in summaries.values() for r in s.get("tau_by_role", {})})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(summaries))
    for i, (pol, s) in enumerate(summaries.items()):
        ax.bar([j + i * width for j in range(len(roles))], [s["tau_by_role"].get(r, 0) for r in roles], width,
               label=pol, color=COLORS.get(pol))
    ax.set_xticks([j + width * (len(summaries) - 1) / 2 for j in range(len(roles))], roles)
    ax.set_ylabel("tau (tokens per target pass, speculative turns)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", help="router_compare output dir")
    ap.add_argument("--projection", help="project_b300 JSON")
    ap.add_argument("--tag", default="real", help="file-name tag for the compare plots")
    ap.add_argument("--out", default="docs")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if a.compare:
        run = Path(a.compare)
        summaries = {p: json.loads((run / f"{p}.summary.json").read_text()) for p in POLICIES
                     if (run / f"{p}.summary.json").exists()}
        made.append(tau_by_role(summaries, out / f"router_tau_by_role_{a.tag}.png", f"tau per role by router ({a.tag})"))
        made.append(headroom_over_time(run, out / f"router_headroom_{a.tag}.png", f"KV headroom over time ({a.tag})"))
    if a.projection:
        proj = json.loads(Path(a.projection).read_text())
        name = Path(a.projection).stem
        made.append(goodput_vs_concurrency(proj, out / f"{name}_goodput.png"))
    for p in made:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
