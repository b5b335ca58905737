"""The differential tier against real MindSpore (see ``run.sh``).

Its tests skip, with the reason, when MindSpore's virtual environment is absent. ``run.sh`` sets
``ASYNCCKPT_REQUIRE_MINDSPORE=1``, which turns every skip here into a failure: the tier either
ran against MindSpore or failed loudly.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("ASYNCCKPT_REQUIRE_MINDSPORE") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped although ASYNCCKPT_REQUIRE_MINDSPORE=1: {report.longrepr}"
