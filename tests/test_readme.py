"""The README is generated from the registry and the settings, and states the two commands."""

from __future__ import annotations

from pathlib import Path

from lossd.server import docs

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev,plot,postgres]' && .venv/bin/python -m pytest"
SERVE_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/lossd serve"
)


def test_loss_table_and_flags_are_current():
    assert docs.render_readme(README) == README, (
        "README is stale: run `python -m lossd.server.docs`"
    )


def test_every_served_loss_is_in_the_readme():
    from lossd.server import registry

    for spec in registry.all_specs():
        assert f"| `{spec.name}`" in README, spec.name


def test_the_two_commands_are_in_the_readme_and_ci_runs_the_test_command():
    assert SERVE_COMMAND in README and TEST_COMMAND in README
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
