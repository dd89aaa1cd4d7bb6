"""Every value recorded from the upstream packages (tests/golden/README.md), reproduced by the
registered loss in process: one test over every family's cases, config cases included (the
same cases through the RPC: tests/test_golden_remote.py)."""

from __future__ import annotations

import pytest

from tests.support.golden import GOLDEN
from tests.support.losskit import run_golden

CASES = sorted(GOLDEN.glob("*/*.pt"))


def test_every_family_has_golden_cases():
    assert {p.parent.name for p in CASES} >= {"fat", "netspresso", "visdet"}


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_case_matches_upstream(path):
    run_golden(path)
