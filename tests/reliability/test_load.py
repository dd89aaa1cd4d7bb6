"""A short run of the sustained load test (``load.py``): several client processes, audit on.

The full run is ``python -m tests.reliability.load`` (a few minutes; figures in the README).
"""

from __future__ import annotations

import pytest

from tests.reliability import load

PEAK_RSS_LIMIT_MIB = 2048  # the mix's largest request is ~13 MB; the server idles at ~250 MiB


@pytest.mark.timeout(240)
def test_short_load(tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the load test drives a CPU server")
    report = load.run(duration=25, clients=3, max_requests=20_000, data_dir=str(tmp_path))
    print(f"\nload: {report}")
    assert report["requests"] >= 100, report
    assert report["unexpected_errors"] == 0, report["unexpected_first"]
    # Bad requests were part of the mix and all got their expected status.
    assert sum(v for k, v in report["outcomes"].items() if not k.endswith(":OK")) > 0, report[
        "outcomes"
    ]
    assert report["server_alive"] and report["server_exit_code"] == 0
    assert report["audited_acknowledged"] > 0
    assert report["audit_records"] == report["audit_distinct"] == report["audited_acknowledged"]
    assert report["audit_exact"], "the audit trail differs from the acknowledged audited calls"
    assert report["rss_peak_mib"] < PEAK_RSS_LIMIT_MIB, report
