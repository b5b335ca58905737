"""The supported torch floor: refused below it with the release needed, stated alike everywhere."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from asyncckpt._versions import MIN_TORCH, check_torch, torch_release

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
FLOOR = ".".join(map(str, MIN_TORCH))


@pytest.mark.parametrize("version", ["2.4.1", "2.5.1+cu124", "2.6.0a0+git1234", "2.6.0", "1.13.1"])
def test_a_torch_below_the_floor_is_refused_naming_both_releases(version):
    with pytest.raises(ImportError, match=re.escape(f"needs torch >= {FLOOR}")) as caught:
        check_torch(version)
    assert f"torch {version} is installed" in str(caught.value)


@pytest.mark.parametrize("version", ["2.7.0", "2.7.1+cu126", "2.7.0a0+git1234", "2.13.0+cpu",
                                     "2.14.1", "3.0.0", "unknown"])
def test_the_floor_and_newer_releases_pass(version):
    check_torch(version)


def test_the_installed_torch_passes():
    assert torch_release(torch.__version__) >= MIN_TORCH
    check_torch()


def test_pyproject_and_the_floor_job_state_the_same_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch>={FLOOR}" in project["dependencies"]
    pins = (ROOT / "constraints-floor.txt").read_text().splitlines()
    torch_pins = [line for line in pins if line.startswith("torch==")]
    assert len(torch_pins) == 1 and torch_release(torch_pins[0][len("torch=="):]) == MIN_TORCH
    floor_python = re.search(r">=(\d+)\.(\d+)", project["requires-python"])
    job = (ROOT / ".ci" / "run-floor").read_text()
    assert floor_python is not None and f"{floor_python[1]}.{floor_python[2]}" in job
