"""The bench's summary of issue 14's targets: every group counted from the run's own rows."""

from __future__ import annotations

from bench import cpu, report


def _cpu_row(loss: str, shape: str, client_own: float, server_own: float) -> dict:
    return {
        "loss": loss,
        "shape": shape,
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


def test_the_summary_counts_each_group_and_says_what_was_not_measured() -> None:
    result = {
        "command": "python -m bench",
        "started": "now",
        "machine": {
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
        },  # fmt: skip
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
