"""Differential tests: every scenario in ``scenarios.py`` runs through real MindSpore 2.10 (in
its own virtual environment, by ``ms_driver.py``) and through asyncckpt's adapter, and the
folder listings after each run, the prefixes, ``latest_ckpt_file_name``, the ``append_info``
values and optimizer presence of every new file, and the validation outcomes must agree, except
for the design differences the scenarios file lists (pinned here on both sides)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .scenarios import (
    DESIGN_DIFFERENCES,
    SCENARIOS,
    VALIDATION,
    VALIDATION_DIFFERENCES,
)
from .torch_driver import run_all

HERE = Path(__file__).resolve().parent
MINDSPORE_VERSION = "2.10.0"


def mindspore_venv() -> Path:
    """Where ``run.sh`` builds MindSpore's virtual environment."""
    configured = os.environ.get("ASYNCCKPT_MINDSPORE_VENV")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "asyncckpt" / "venv-mindspore-2.10"


@pytest.fixture(scope="module")
def mindspore(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = mindspore_venv() / "bin" / "python"
    if not python.exists():
        pytest.skip(f"MindSpore's virtual environment is absent ({python}); "
                    "tests/mindspore_diff/run.sh builds it and runs this tier")
    work = tmp_path_factory.mktemp("mindspore")
    out = work / "results.json"
    # cwd outside the repository: MindSpore's own `numpy` subpackage must not shadow numpy
    done = subprocess.run(
        [str(python), str(HERE / "ms_driver.py"), str(out), str(work)],
        cwd=work, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, f"ms_driver.py failed:\n{done.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert results["version"] == MINDSPORE_VERSION
    return results


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_all(str(tmp_path_factory.mktemp("asyncckpt")))


AGREEING = [name for name in SCENARIOS if name not in DESIGN_DIFFERENCES]


@pytest.mark.parametrize("name", AGREEING)
def test_scenario_matches_mindspore(name: str, mindspore: dict[str, Any],
                                    ours: dict[str, Any]) -> None:
    theirs = mindspore["scenarios"][name]
    assert "driver_error" not in theirs, theirs
    assert ours["scenarios"][name] == theirs


def test_per_n_minutes_windows_differ_as_documented(mindspore: dict[str, Any],
                                                    ours: dict[str, Any]) -> None:
    # one save every 25 s, keep_checkpoint_per_n_minutes=1: MindSpore keeps the oldest file of
    # the last minute at each save; asyncckpt the first of each minute from the first save
    name = "per_n_minutes_dense_saves"
    assert [r["files"] for r in mindspore["scenarios"][name]] == [
        ["CKP-1_1.ckpt", "CKP-1_3.ckpt", "CKP-1_5.ckpt", "CKP-1_6.ckpt"]
    ]
    assert [r["files"] for r in ours["scenarios"][name]] == [
        ["CKP-1_1.ckpt", "CKP-1_4.ckpt", "CKP-1_6.ckpt"]
    ]


@pytest.mark.parametrize("name", list(VALIDATION))
def test_validation_matches_mindspore(name: str, mindspore: dict[str, Any],
                                      ours: dict[str, Any]) -> None:
    theirs, mine = mindspore["validation"][name], ours["validation"][name]
    if name in VALIDATION_DIFFERENCES:
        expected_theirs, expected_mine, _why = VALIDATION_DIFFERENCES[name]
        assert (theirs, mine) == (expected_theirs, expected_mine)
    else:
        assert mine == theirs


def test_every_scenario_ran_on_both_sides(mindspore: dict[str, Any],
                                          ours: dict[str, Any]) -> None:
    assert set(mindspore["scenarios"]) == set(ours["scenarios"]) == set(SCENARIOS)
    assert set(mindspore["validation"]) == set(ours["validation"]) == set(VALIDATION)
