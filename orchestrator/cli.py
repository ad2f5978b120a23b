"""`specfleet` command line: a thin dispatcher.

Each subcommand lives in its own module under ``orchestrator/commands/`` and exposes
``register(subparsers)`` (adds its parser, sets ``func``). Heavy imports (torch, ray) happen
inside the command's run function, so ``specfleet --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand module names, in the order `specfleet --help` lists them
COMMANDS = ("serve", "generate", "plan", "models", "make_corpus", "train_drafter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specfleet",
        description="Speculative-decoding serving on Ray with DFlash block-diffusion drafters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"orchestrator.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name == f"orchestrator.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `specfleet plan --json | head`: the reader left; stop quietly, as Unix tools do
        _silence_stdout()
        return 141  # 128 + SIGPIPE
    except Exception as exc:  # user-facing errors carry a clear message, no traceback
        from workers.engine.params import EngineError

        if isinstance(exc, (EngineError, FileNotFoundError, ValueError)):
            print(f"specfleet {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise
    return int(rc or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a captured stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())
