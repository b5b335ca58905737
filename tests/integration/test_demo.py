"""The README's main command: the demo trains, saves, reports and resumes."""

from __future__ import annotations

import subprocess
import sys

from asyncckpt._cli import main


def test_demo_reports_and_resumes(tmp_path, capsys):
    folder = tmp_path / "demo"
    argv = ["demo", "--dir", str(folder), "--steps", "20", "--every", "5", "--keep-last", "2",
            "--width", "32", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 committed, 0 skipped" in out
    assert "training loop stalled per save" in out and "torch.save + fsync" in out
    assert "step_20.pt" in out and "asyncckpt-index.json" in out
    assert "resumed from step_20.pt: step 20, model + optimizer identical" in out
    assert main(["ls", str(folder)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in listing][-1] == "step_20.pt"


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "ls", str(tmp_path / "missing")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1 and "neither a checkpoint folder" in result.stderr
