"""A 50-step training run through RemoteLoss, audited with input capture, on both backends:
export it, verify it, tamper with it, plot it."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lossd.client import RemoteLoss, audit_run
from lossd.server.app import create_server
from lossd.server.audit import cli
from lossd.server.config import ServerConfig
from tests.support.auditkit import BACKENDS, independent_digest, make_db, sql

STEPS = 50


@dataclass
class Trained:
    db: str
    endpoint: str
    run_id: str
    losses: list[float]  # what the training loop saw, per step
    logits: list[torch.Tensor]
    targets: list[torch.Tensor]
    grad_norms: list[float]
    device: str  # what the server computed on, as records name it


@pytest.fixture(scope="module", params=BACKENDS)
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, device: torch.device
):
    """``pytest --device cuda`` runs the server (and verify's same-device recomputation) on the GPU."""
    directory = tmp_path_factory.mktemp(f"trail-{request.param}")
    db = make_db(request.param, directory, request)
    running = create_server(
        ServerConfig(
            port=0,
            device=str(device),
            workers=4,
            audit_db=db,
            audit_capture="inputs",
            data_dir=str(directory),
        )
    )
    endpoint = f"127.0.0.1:{running.port}"
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    crit = RemoteLoss(
        "cross_entropy",
        endpoint=endpoint,
        timeout=60,
        run_id=f"train-{request.param}",
        tags={"test": "trail"},
        label_smoothing=0.05,
    )
    run = Trained(db, endpoint, crit.run_id, [], [], [], [], str(running.engine.device))
    x_all, y_all = torch.randn(64, 8), torch.randint(0, 4, (64,))
    for step in range(STEPS):
        idx = torch.randint(0, 64, (16,))
        crit.step = step
        logits = model(x_all[idx])
        logits.retain_grad()
        loss = crit(logits, y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert crit.last_result.audited, f"step {step} was not acknowledged as written"
        run.losses.append(loss.item())
        run.logits.append(logits.detach().clone())
        run.targets.append(y_all[idx].clone())
        run.grad_norms.append(float(torch.linalg.vector_norm(logits.grad.double())))
    crit.close()
    yield run
    running.stop(0)


def export_records(run: Trained, tmp_path: Path, fmt: str = "jsonl") -> Path:
    out = tmp_path / f"export.{fmt}"
    assert (
        cli.main(
            ["export", run.run_id, "--format", fmt, "-o", str(out), "--endpoint", run.endpoint]
        )
        == 0
    )
    return out


def test_export_has_one_record_per_step_with_the_loop_values_and_digests(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    records = [
        json.loads(line) for line in export_records(trained, tmp_path).read_text().splitlines()
    ]
    assert len(records) == STEPS
    assert [r["step"] for r in records] == list(range(STEPS))
    assert [r["value"] for r in records] == trained.losses  # exact: the float32 the loop saw
    for r, logits, targets, norm in zip(
        records, trained.logits, trained.targets, trained.grad_norms
    ):
        assert (
            r["run_id"] == trained.run_id
            and r["loss"] == "cross_entropy"
            and r["tags"] == {"test": "trail"}
        )
        assert (
            r["params"]["label_smoothing"] == 0.05
            and r["device"] == trained.device
            and r["dtype"] == "float32"
        )
        assert (
            r["lossd_version"]
            and r["torch_version"] == torch.__version__
            and r["peer"].startswith("ipv4:127.0.0.1:")
        )
        by_path = {i["path"]: i for i in r["inputs"]}
        assert by_path["args[0]"]["sha256"] == independent_digest(logits)
        assert by_path["args[1]"]["sha256"] == independent_digest(targets)
        assert by_path["args[0]"]["shape"] == [16, 4] and by_path["args[1]"]["dtype"] == "int64"
        assert all(i["captured"] for i in r["inputs"])
        assert r["grad_norms"]["args[0]"] == pytest.approx(norm, rel=1e-5)
    assert f"{STEPS} records" in capsys.readouterr().err  # progress/summary on stderr


def test_csv_export_and_step_selection(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "steps.csv"
    assert (
        cli.main(
            [
                "export",
                trained.run_id,
                "--format",
                "csv",
                "-o",
                str(out),
                "--step",
                "10:14",
                "--endpoint",
                trained.endpoint,
                "--quiet",
            ]
        )
        == 0
    )
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [int(r["step"]) for r in rows] == [10, 11, 12, 13, 14]
    assert [float(r["value"]) for r in rows] == trained.losses[10:15]


def test_verify_passes_on_the_untouched_run(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["verify", trained.run_id, "--endpoint", trained.endpoint]) == 0
    out, err = capsys.readouterr()
    assert out.count("ok   OK") == STEPS and "FAIL" not in out
    assert (
        f"verify passed for run {trained.run_id!r}: {STEPS} records: {STEPS} verified, 0 failed, "
        f"0 not recomputable; chain of {STEPS} records intact" in err
    )


def _record(run: Trained, step: int) -> tuple[int, str, str, str]:
    rows = sql(
        run.db,
        "SELECT id, request_id, value, inputs FROM audit_records WHERE run_id = ? AND step = ?",
        (run.run_id, step),
    )
    assert len(rows) == 1
    return rows[0]


def test_verify_fails_naming_the_record_whose_value_was_altered(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    record_id, request_id, value, _ = _record(trained, 17)
    form = json.loads(value)
    form["tensor"]["data"][0] *= 0.9  # a quietly "better" loss
    sql(
        trained.db, "UPDATE audit_records SET value = ? WHERE id = ?", (json.dumps(form), record_id)
    )
    try:
        assert cli.main(["verify", trained.run_id, "--endpoint", trained.endpoint]) == 1
    finally:
        sql(trained.db, "UPDATE audit_records SET value = ? WHERE id = ?", (value, record_id))
    out, err = capsys.readouterr()
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert (
        f"RECORD_ALTERED run {trained.run_id} seq 18 step 17 record {record_id} request {request_id}"
        in failed[0]
    )
    assert "DEVIATION" in failed[0]  # the recomputation shows how far off the stored value is
    assert "1 of 50 records failed" in err
    assert (
        cli.main(["verify", trained.run_id, "--endpoint", trained.endpoint, "--quiet"]) == 0
    )  # restored


def test_verify_fails_naming_the_record_whose_stored_input_was_altered(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    record_id, request_id, _, inputs = _record(trained, 30)
    digest = next(i["sha256"] for i in json.loads(inputs) if i["path"] == "args[0]")
    (data,) = sql(trained.db, "SELECT data FROM audit_blobs WHERE digest = ?", (digest,))[0]
    altered = trained.logits[30].clone()
    altered[0, 0] += 1.0
    sql(
        trained.db,
        "UPDATE audit_blobs SET data = ? WHERE digest = ?",
        (zlib.compress(altered.numpy().tobytes()), digest),
    )
    try:
        assert cli.main(["verify", trained.run_id, "--endpoint", trained.endpoint, "--quiet"]) == 1
    finally:
        sql(trained.db, "UPDATE audit_blobs SET data = ? WHERE digest = ?", (bytes(data), digest))
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert (
        f"INPUT_MISMATCH run {trained.run_id} seq 31 step 30 record {record_id} request {request_id}"
        in failed[0]
    )
    assert "args[0]" in failed[0] and digest[:12] in failed[0]


def test_plot_writes_a_png_of_the_run_steps(trained: Trained, tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    assert cli.main(["plot", trained.run_id, "-o", str(png), "--endpoint", trained.endpoint]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    from PIL import Image

    meta = Image.open(png).text
    assert meta["lossd-run"] == trained.run_id
    assert meta["lossd-steps"] == ",".join(str(s) for s in range(STEPS))


def test_runs_and_show_list_the_run(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["runs", "--json", "--endpoint", trained.endpoint]) == 0
    runs = {r["run_id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert runs[trained.run_id]["records"] == STEPS
    assert (runs[trained.run_id]["first_step"], runs[trained.run_id]["last_step"]) == (0, STEPS - 1)
    assert (
        cli.main(
            [
                "show",
                trained.run_id,
                "--step",
                "3:4",
                "--loss",
                "cross_entropy",
                "--endpoint",
                trained.endpoint,
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [int(line.split()[0]) for line in lines] == [3, 4]


def test_audit_run_numbers_calls_and_merges_tags(trained: Trained) -> None:
    """Calls inside ``audit_run`` are numbered; calls outside any run are not audited."""
    crit = RemoteLoss("cross_entropy", endpoint=trained.endpoint, timeout=60, tags={"loss": "ce"})
    a, b = torch.randn(3, 4), torch.tensor([0, 3, 1])
    crit(a, b)
    assert not crit.last_result.audited
    with audit_run("numbered", tags={"commit": "abc"}, rank=2) as run:
        for _ in range(3):
            crit(a, b)
            assert crit.last_result.audited
        run.step = 10
        crit(a, b)
        crit(a, b)
    crit.close()
    from lossd.client import AuditClient

    with AuditClient(trained.endpoint) as reader:
        records = list(reader.records("numbered"))
    assert [r["step"] for r in records] == [0, 1, 2, 10, 10]
    assert all(r["tags"] == {"commit": "abc", "loss": "ce"} and r["rank"] == 2 for r in records)


def test_a_module_copy_keeps_its_run_and_step(trained: Trained) -> None:
    import copy
    import pickle

    crit = RemoteLoss(
        "cross_entropy", endpoint=trained.endpoint, timeout=60, run_id="copied", step=7
    )
    twin = pickle.loads(pickle.dumps(copy.deepcopy(crit)))
    assert (twin.run_id, twin.step) == ("copied", 7)
    twin(torch.randn(2, 3), torch.tensor([0, 2]))
    assert twin.last_result.audited and twin.step == 8 and crit.step == 7
    crit.close()
    twin.close()


def test_the_lossd_command_dispatches_audit(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    from lossd.server.cli import main

    assert (
        main(["audit", "show", trained.run_id, "--step", "49", "--endpoint", trained.endpoint]) == 0
    )
    (line,) = capsys.readouterr().out.splitlines()[1:]
    assert line.split()[0] == "49" and f"{trained.losses[49]:.6g}" in line


def test_verify_recomputation_catches_a_value_forged_with_a_fresh_record_digest(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    """Someone who edits a value and recomputes record_sha256 is still caught: the loss,
    recomputed from the captured inputs, does not give the stored value."""
    from lossd.server.audit.records import COLUMNS, Row

    names = ("id", *COLUMNS)
    (raw,) = sql(
        trained.db,
        f"SELECT {', '.join(names)} FROM audit_records WHERE run_id = ? AND step = 5",
        (trained.run_id,),
    )
    row = Row.from_db(dict(zip(names, raw)))
    original = (row.value, row.record_sha256)
    form = json.loads(row.value)
    form["tensor"]["data"][0] *= 1.001
    row.value = json.dumps(form, separators=(",", ":"))
    row.record_sha256 = row.digest()
    sql(
        trained.db,
        "UPDATE audit_records SET value = ?, record_sha256 = ? WHERE id = ?",
        (row.value, row.record_sha256, row.id),
    )
    try:
        assert cli.main(["verify", trained.run_id, "--endpoint", trained.endpoint, "--quiet"]) == 1
    finally:
        sql(
            trained.db,
            "UPDATE audit_records SET value = ?, record_sha256 = ? WHERE id = ?",
            (*original, row.id),
        )
    deviation, broken = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")
    ]
    assert (
        f"DEVIATION      run {trained.run_id} seq 6 step 5 record {row.id} request {row.request_id}"
        in deviation
    )
    assert f"recomputation on {trained.device} in float32 deviates by 0.000999" in deviation
    # ... and the hash chain names it too: the next record committed to the original digest.
    assert f"CHAIN_BROKEN   run {trained.run_id} seq 7 step 6" in broken
    assert f"does not link to record {row.id} (seq 6, step 5" in broken
