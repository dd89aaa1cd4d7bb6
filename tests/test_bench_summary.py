"""The bench's summary of issue 14's targets: every group counted from the run's own rows."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from bench import before, cpu, report
from bench.servers import ROOT, lossd_server

# what render_machine reads of a run
_MACHINE = {
    k: "?"
    for k in (
        "cpu",
        "cores",
        "memory_gib",
        "platform",
        "python",
        "torch",
        "grpcio",
        "protobuf",
        "device",
    )
}


def _cpu_row(loss: str, shape: str, client_own: float, server_own: float) -> dict:
    return {
        "loss": loss,
        "shape": shape,
        "calls": 500,
        "echo": {"client_ms": 0.25, "server_ms": 0.30},
        "lossd": {"client_ms": 0.25 + client_own, "server_ms": 0.30 + server_own},
        "local": {"client_ms": 0.2},
    }


def test_the_halving_target_compares_each_side_with_its_figure_before_the_issue() -> None:
    before_client, before_server = cpu.OWN_BEFORE["cross_entropy", "16x16 f32"]
    rows = [
        _cpu_row("cross_entropy", "16x16 f32", 0.49 * before_client, 0.6 * before_server),
        _cpu_row("mse", "8 f32", 0.01, 0.01),  # no figure before: no target
    ]
    found = {t["target"].split(":")[1].split()[0]: t for t in cpu.targets(rows)}
    assert set(found) == {"client", "server"}
    assert found["client"]["met"] and abs(found["client"]["value"] - 0.49) < 1e-9
    assert not found["server"]["met"] and abs(found["server"]["value"] - 0.6) < 1e-9


def test_the_halving_target_takes_the_before_column_of_the_same_run_over_the_recorded_figures() -> (
    None
):
    row = _cpu_row("cross_entropy", "16x16 f32", 0.40, 0.50)
    row["before"] = {"client_ms": 0.25 + 1.0, "server_ms": 0.30 + 0.9}  # own before: 1.0, 0.9
    found = {t["target"].split(":")[1].split()[0]: t for t in cpu.targets([row])}
    assert abs(found["client"]["value"] - 0.40) < 1e-9 and found["client"]["met"]
    assert abs(found["server"]["value"] - 0.50 / 0.9) < 1e-9 and not found["server"]["met"]
    assert "in this run" in found["server"]["target"]
    assert "before: client / server" in cpu.render(
        {"command": "c", "started": "s", "machine": _MACHINE, "cpu": [row]}
    )
    del row["before"]  # a run that could not measure it: the recorded figures, and it says so
    recorded = {t["target"].split(":")[1].split()[0]: t for t in cpu.targets([row])}
    assert "recorded on another machine" in recorded["server"]["target"]
    assert "1 of 1 rows could not measure it" in cpu.render(
        {"command": "c", "started": "s", "machine": _MACHINE, "cpu": [row]}
    )


def _has_before_commit() -> bool:
    probe = ["git", "-C", str(ROOT), "cat-file", "-e", f"{before.BEFORE}^{{commit}}"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _has_before_commit(), reason=f"this clone lacks {before.BEFORE}")
def test_the_before_column_runs_lossd_as_it_was_at_that_commit(tmp_path: Path) -> None:
    shim = before.checkout(tmp_path)
    opts = argparse.Namespace(workers=1, max_message_mb=64, device="cpu", server_arg=[])
    server = lossd_server(opts, tmp_path / "data", env=before.environment(shim)).start()
    try:
        client = before.BeforeClient(shim, server.address, 0, calls=5)  # checks whose lossd ran
        try:
            assert 0.0 < client.block() < 1e3
        finally:
            client.close()
        # the server imports lossd from the same shim (the client's own check read its module path)
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert f"PYTHONPATH={shim}".encode() in [e.split(b":")[0] for e in environ]
    finally:
        server.stop()
    with pytest.raises(before.BeforeUnavailable, match="git archive"):
        before.checkout(tmp_path, commit="0" * 40)


def test_the_summary_counts_each_group_and_says_what_was_not_measured() -> None:
    result = {
        "command": "python -m bench",
        "started": "now",
        "machine": _MACHINE,
        "targets": [
            {"target": "a", "value": 1.4, "met": True, "group": "small calls over TCP"},
            {"target": "b", "value": 1.7, "met": False, "group": "small calls over TCP"},
            {"target": "c", "value": 2700.0, "met": True, "group": "network path"},
            {"target": "old", "value": 9.0, "met": False},  # an earlier issue's: not summarised
        ],
    }
    lines = {
        line.split(" | ")[0].lstrip("| "): line
        for line in report.render_summary(result).splitlines()
    }
    assert "1 of 2 (**missed**) | 1.40 - 1.70" in lines["small calls over TCP"]
    assert "1 of 1 | 2,700.00" in lines["network path"]
    assert "not measured in this run" in lines["throughput"]
    assert set(report.SUMMARY_GROUPS) <= set(lines)
