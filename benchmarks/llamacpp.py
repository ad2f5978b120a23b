"""llama.cpp's ``llama-bench`` on the same machine, for side-by-side figures (what a CPU user would run instead).

Uses the binary in ``../shared/anchors/llama.cpp`` (built for this CPU: AVX512-BF16, no AMX). Its ``lib/``
folder may hold the shared-library symlinks as small text files naming their target (a copy that lost its
links); ``_lib_dir`` rebuilds them as real symlinks in the cache before running.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

def _find_anchor() -> Path:
    """The nearest ``shared/anchors/llama.cpp`` above this checkout (or $SPECFLEET_LLAMACPP)."""
    env = os.environ.get("SPECFLEET_LLAMACPP")
    if env:
        return Path(env)
    for up in Path(__file__).resolve().parents:
        cand = up / "shared" / "anchors" / "llama.cpp"
        if cand.is_dir():
            return cand
    return Path("shared/anchors/llama.cpp")


ANCHOR = _find_anchor()


def _lib_dir(anchor: Path) -> Path:
    src = anchor / "lib"
    out = Path("~/.cache/specfleet/llamacpp-lib").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = f
        if f.stat().st_size < 256 and not f.is_symlink():  # a flattened symlink: the file holds the target name
            name = f.read_text().strip()
            if (src / name).exists():
                target = src / name
        link = out / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    return out


def llama_bench(gguf: str | Path, threads: int = 2, prompt: int = 512, gen: int = 64, reps: int = 3,
                anchor: Path = ANCHOR) -> dict:
    """-> {"pp_tok_s", "pp_std", "tg_tok_s", "tg_std", "model"}; raises FileNotFoundError without the binary."""
    exe = anchor / "llama-bench"
    if not exe.is_file():
        raise FileNotFoundError(f"no llama-bench at {exe}")
    env = dict(os.environ, LD_LIBRARY_PATH=str(_lib_dir(anchor)))
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(reps),
           "-o", "json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800).stdout
    res = {"model": Path(gguf).name, "command": " ".join(cmd)}
    for row in json.loads(out):
        key = "pp" if row.get("n_prompt", 0) > 0 else "tg"
        res[f"{key}_tok_s"], res[f"{key}_std"] = float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))
    return res
