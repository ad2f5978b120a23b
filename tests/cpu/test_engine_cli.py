"""`specfleet generate` end to end on a tiny model + drafter written to disk (AR and DFlash give the same text)."""
from __future__ import annotations

import pytest

from orchestrator.cli import main
from tests.helpers.tiny import make_tiny_hf_dir, tiny_drafter
from workers.models.dflash import save_drafter
from workers.models.loader import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_streams_text_and_reports_tau(tmp_path, capsys):
    model = make_tiny_hf_dir(tmp_path / "m", "llama", seed=4)
    save_drafter(tiny_drafter(load_model(model, "float32", "cpu").config, block_size=8), tmp_path / "d")
    common = ["generate", "--model", str(model), "--max-tokens", "12", "--device", "cpu", "w5 w6 w7"]
    assert main(common + ["--drafter", str(tmp_path / "d"), "--block-size", "4"]) == 0
    spec = capsys.readouterr()
    assert main(common + ["--no-spec"]) == 0
    ar = capsys.readouterr()
    assert spec.out.strip() and spec.out == ar.out
    assert "tok/s" in spec.err and "tau" in spec.err and "DFlash block 4" in spec.err and "AR" in ar.err


def test_generate_bad_input_is_a_clean_error(tmp_path, capsys):
    model = make_tiny_hf_dir(tmp_path / "m", "llama", seed=4)
    assert main(["generate", "--model", str(tmp_path / "nope"), "x"]) == 1
    assert "neither a path nor a cached model" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "--device", "cpu", "--temperature", "5", "w5"]) == 1
    assert "temperature" in capsys.readouterr().err
