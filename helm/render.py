"""`helm template` without a helm binary: render helm/specfleet with helm-python-sdk (Helm's Go SDK,
bundled in the PyPI wheel as a C library) and print the manifests.

    python helm/render.py -f helm/specfleet/values-dgx-b300.yaml --name specfleet --namespace llm
    python helm/render.py --set gpuWorkers.gpusPerNode=8 --set 'serve.replicas[0].count=8'
    python helm/render.py --lint -f helm/specfleet/values-single-gpu.yaml

Values are merged like helm's -f/--set (later wins); the chart's values.schema.json and its
render-time checks apply, and a failure exits 1 with Helm's message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parent / "specfleet"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main(argv: list[str] | None = None) -> int:
    import helm_python as helm
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value (helm --set syntax, repeatable)")
    ap.add_argument("--name", default="specfleet", help="release name")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--chart", default=str(CHART))
    ap.add_argument("--notes", action="store_true", help="print NOTES.txt too")
    ap.add_argument("--lint", action="store_true", help="run helm lint (strict) instead of rendering")
    args = ap.parse_args(argv)

    values: dict[str, Any] = {}
    for f in args.values:
        values = merge(values, yaml.safe_load(Path(f).read_text()) or {})
    if args.set:  # one expression, as helm applies repeated --set flags (list indices merge)
        values = merge(values, helm.parse_set_string(",".join(args.set)))
    try:
        if args.lint:
            report = helm.lint(args.chart, values or None, strict=True, namespace=args.namespace)
            for m in report["messages"]:
                print(f"[{('UNKNOWN', 'INFO', 'WARNING', 'ERROR')[m['severity']]}] {m['path']}: {m['error']}")
            print(f"{report['total_charts_linted']} chart(s) linted, {len(report['errors'])} error(s)")
            return 1 if report["errors"] else 0
        with helm.Chart.load(args.chart) as chart:
            out = chart.render(values, name=args.name, namespace=args.namespace)
    except helm.HelmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in sorted(out):
        text = out[path].strip()
        if not text or (path.endswith("NOTES.txt") and not args.notes):
            continue
        print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
