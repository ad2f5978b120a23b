"""docs/architecture.md is the map of the tree: it names every source file of the three packages."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_architecture_map_names_every_source_file():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for pkg in ("orchestrator", "workers", "cluster"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.name == "__init__.py":
                continue
            rel = f.relative_to(ROOT).as_posix()
            folder = f.parent.relative_to(ROOT).as_posix() + "/"
            if rel not in doc and not (f.name in doc and folder in doc):  # the path, or the name under its folder
                missing.append(rel)
    assert not missing, f"docs/architecture.md does not name {missing}: add one line each where it belongs"
    assert "../" not in doc, "the map points outside the repository"
