"""`orchestrator run FILE` loads a file's trainer and fits it (on the session's Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_cli_run_fits_the_trainer_that_the_example_file_makes(ray_cluster, capsys):
    assert cli.main(["run", str(ROOT / "examples" / "digits.py"), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out
    assert "finished:" in out and "val_accuracy=" in out


def test_cli_run_names_a_file_that_has_no_trainer(tmp_path):
    entry = tmp_path / "empty.py"
    entry.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="defines neither `trainer` nor `make_trainer"):
        cli.main(["run", str(entry)])


def test_cli_run_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        cli.main(["run", str(tmp_path / "nope.py")])
