"""Recomputation by default: the sampled capture (each attempt's first call and 1 in N, by a
keyed hash of the request id) is what verify recomputes; verify says verified, failed and not
recomputable apart, and fails when nothing (or not the whole sample) could be recomputed.
Run identity: a run id reused by another process is told apart. CLI consistency."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from lossd.client import AuditClient, LossClient
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.audit import figure
from lossd.client.functional import build_request
from lossd.server.app import create_server
from lossd.server.audit import cli
from lossd.server.audit.recorder import AuditRecorder, parse_capture
from lossd.server.audit.signing import Signer
from lossd.server.audit.store import open_store
from lossd.server.config import ServerConfig, SettingError


def call(
    endpoint: str, run_id: str, steps: range, session: str = "s", ids: list[str] | None = None
) -> list[str]:
    sent = []
    with LossClient(endpoint, timeout=60) as client:
        for step in steps:
            request = build_request(
                "cross_entropy",
                {},
                [torch.randn(4, 3), torch.randint(0, 3, (4,))],
                {},
                audit=pb.AuditContext(
                    run_id=run_id, step=step, session=session, rank=-1, micro_batch=-1
                ),
            )
            if ids:
                request.request_id = ids[step]
            assert client.compute(request).audited
            sent.append(request.request_id)
    return sent


@pytest.fixture()
def server(tmp_path: Path, request: pytest.FixtureRequest):
    config = ServerConfig(
        port=0, device="cpu", data_dir=str(tmp_path), **getattr(request, "param", {})
    )
    running = create_server(config)
    yield running, f"127.0.0.1:{running.port}"
    running.stop(0)


def test_the_default_sample_is_recomputed_by_verify(server, capsys: pytest.CaptureFixture) -> None:
    running, endpoint = server
    assert running.config.audit_capture == "sample:100"
    run_id = "sampled-" + uuid.uuid4().hex[:6]
    # Request ids the server's key samples at steps 40 and 90, and does not elsewhere (the test
    # can tell only because it holds the server; a client cannot). About 1 in 100 is sampled.
    recorder = running.audit
    recorder.capture_reason("probe", "probe-run", "x")  # the probe run's first call is taken
    candidates = [uuid.uuid4().hex for _ in range(2000)]
    sampled = [i for i in candidates if recorder.capture_reason(i, "probe-run", "x") == "sample"]
    assert 5 < len(sampled) < 45
    rest = iter(i for i in candidates if i not in sampled)
    ids = [sampled[0] if s == 40 else sampled[1] if s == 90 else next(rest) for s in range(150)]
    expected = {sampled[0], sampled[1]}
    call(endpoint, run_id, range(150), ids=ids)
    assert cli.main(["verify", run_id, "--endpoint", endpoint]) == 0
    out, err = capsys.readouterr()
    ok = [line for line in out.splitlines() if line.startswith("ok   OK")]
    assert len(ok) == 1 + len(expected)  # the attempt's first call, and the sample
    assert f"request {ids[0]} " in ok[0]
    assert {line.split(" request ")[1].split()[0] for line in ok[1:]} == expected
    n = 150 - len(ok)
    assert f"150 records: {len(ok)} verified, 0 failed, {n} not recomputable" in err
    assert cli.main(["checkpoint", run_id, "--endpoint", endpoint]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 150
    assert "lossd_audit_checkpoints_signed_total" in running.metrics.exposition().decode()


@pytest.mark.parametrize("server", [{"audit_capture": "none"}], indirect=True)
def test_nothing_recomputable_fails_saying_why(server, capsys: pytest.CaptureFixture) -> None:
    _, endpoint = server
    call(endpoint, "uncaptured", range(20))
    assert cli.main(["verify", "uncaptured", "--endpoint", endpoint, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "verify FAILED for run 'uncaptured': nothing was recomputed" in err
    assert "20 records: 0 verified, 0 failed, 20 not recomputable" in err


@pytest.mark.parametrize("server", [{"audit_capture_max_mb": 0}], indirect=True)
def test_a_sampled_record_that_was_not_stored_fails_verify(server, capsys) -> None:
    _, endpoint = server
    call(endpoint, "capped", range(3))  # the first call is sampled, but the cap is 0
    assert cli.main(["verify", "capped", "--endpoint", endpoint, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 records chosen for recomputation (the capture sample) could not be recomputed" in err


def test_the_sample_is_keyed_deterministic_and_about_1_in_n(tmp_path: Path) -> None:
    def recorder(signer: Signer, capture: str = "sample:10") -> AuditRecorder:
        return AuditRecorder(
            open_store(str(tmp_path / "s.sqlite3")), capture=capture, signer=signer
        )

    key = Signer.generate()
    a, again, other = recorder(key), recorder(key), recorder(Signer.generate())
    ids = [uuid.uuid4().hex for _ in range(4000)]
    for r in (a, again, other):
        r.capture_reason("warm", "run", "s")  # the attempt's first call
    picked = {i for i in ids if a.capture_reason(i, "run", "s") == "sample"}
    assert picked == {i for i in ids if again.capture_reason(i, "run", "s") == "sample"}
    assert 300 < len(picked) < 500  # 1 in 10
    # Another key picks other calls: a client that knows only its request ids cannot steer it.
    theirs = {i for i in ids if other.capture_reason(i, "run", "s") == "sample"}
    assert len(picked & theirs) < 100
    assert a.capture_reason("x", "new-run", "s") == "first"
    assert recorder(key, "all").capture_reason("x", "run", "s") == "all"
    assert recorder(key, "none").capture_reason("x", "new", "s") == ""
    for r in (a, again, other):
        r.close()


def test_capture_settings() -> None:
    assert [parse_capture(t) for t in ("all", "inputs", "none", "sample", "sample:7")] == [
        1,
        1,
        0,
        100,
        7,
    ]
    for bad in ("sample:0", "sample:x", "some"):
        with pytest.raises(SettingError, match="--audit-capture must be all, none or sample:N"):
            parse_capture(bad)


def test_a_reused_run_id_is_told_apart_by_session(server, capsys: pytest.CaptureFixture) -> None:
    _, endpoint = server
    call(endpoint, "reused", range(5), session="first-process")
    call(endpoint, "reused", range(3), session="second-process")
    assert cli.main(["runs", "--json", "--endpoint", endpoint]) == 0
    (run,) = [
        r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["run_id"] == "reused"
    ]
    assert [(s["session"], s["records"], s["last_step"]) for s in run["sessions"]] == [
        ("first-process", 5, 4),
        ("second-process", 3, 2),
    ]
    assert cli.main(["runs", "--endpoint", endpoint]) == 0
    out = capsys.readouterr().out
    assert "session first-process" in out and "session second-process" in out
    assert cli.main(["show", "reused", "--json", "--endpoint", endpoint]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["session"] for r in records} == {"first-process", "second-process"}


def test_the_client_names_its_process_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from lossd.client import audit

    monkeypatch.setattr(audit, "_SESSION", None)
    monkeypatch.delenv("LOSSD_AUDIT_SESSION", raising=False)
    first = audit.make_context("r", 0, None, None, {}).session
    assert len(first) == 16 and audit.make_context("r", 1, None, None, {}).session == first
    monkeypatch.setenv("LOSSD_AUDIT_SESSION", "job-7")
    assert audit.make_context("r", 2, None, None, {}).session == "job-7"
    assert audit.make_context("", 0, None, None, {}).session == ""


def test_an_empty_selection_gives_one_message_and_exit_from_every_reader(
    server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, endpoint = server
    argvs = {
        "show": ["show", "nothing-here"],
        "export": ["export", "nothing-here", "-o", str(tmp_path / "x.jsonl")],
        "verify": ["verify", "nothing-here"],
        "plot": ["plot", "nothing-here", "-o", str(tmp_path / "x.png")],
    }
    for name, argv in argvs.items():
        assert cli.main([*argv, "--endpoint", endpoint]) == cli.NO_RECORDS == 1, name
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"lossd audit {name}: no records for run 'nothing-here' with that selection"
        )


def test_show_prints_a_dash_for_an_unknown_micro_batch_and_rank(server, capsys) -> None:
    _, endpoint = server
    call(endpoint, "dashes", range(1))
    assert cli.main(["show", "dashes", "--endpoint", endpoint]) == 0
    (line,) = capsys.readouterr().out.splitlines()[1:]
    assert line.split()[:3] == ["0", "-", "-"]


def test_the_plot_step_axis_has_integer_ticks() -> None:
    records = [
        {"run_id": "r", "loss": "ce", "step": s, "value": 1.0 / (s + 1), "components": {}}
        for s in range(3)
    ]
    fig = figure(records)
    ticks = fig.axes[-1].get_xticks()
    shown = [t for t in ticks if 0 <= t <= 2]
    assert shown and all(float(t).is_integer() for t in shown)


def _until_stored_and_signed(running, endpoint: str, run_id: str, records: int) -> None:
    """Once the run is idle (--audit-checkpoint-s) the writer stores its last call's inputs and
    signs its head: waited for as such, however late a busy machine runs the writer."""
    deadline = time.monotonic() + 60
    with AuditClient(endpoint, timeout=30) as audit:
        while time.monotonic() < deadline:
            last = list(audit.verify(run_id))[-1].result
            signed = running.audit.store.checkpoints(run_id)
            if last.status == pb.VERIFY_STATUS_OK and signed and signed[0].records == records:
                return
            time.sleep(0.1)
    raise AssertionError(f"run {run_id!r}: its last call never became recomputable and signed")


def test_a_runs_last_call_is_recomputable_once_the_run_is_idle_or_the_server_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = ServerConfig(
        port=0,
        device="cpu",
        data_dir=str(tmp_path),
        audit_capture="sample:1000000",  # the first call of an attempt, and (almost) no other
        audit_checkpoint_s=0.3,
    )
    running = create_server(config)
    endpoint = f"127.0.0.1:{running.port}"
    try:
        ids = call(endpoint, "tail", range(6))
        _until_stored_and_signed(running, endpoint, "tail", 6)
        assert cli.main(["verify", "tail", "--endpoint", endpoint]) == 0
        out, err = capsys.readouterr()
        ok = [line for line in out.splitlines() if line.startswith("ok   OK")]
        assert [line.split(" request ")[1].split()[0] for line in ok] == [ids[0], ids[5]]
        assert "inputs stored after the record was written" in ok[1]
        assert running.audit.stats()["checkpoints_signed"] >= 1  # periodically, idle included
        assert "signed up to seq 6" in err
        call(endpoint, "tail-2", range(3))
    finally:
        running.stop(0)  # at shutdown too
    running = create_server(config.replace(audit_checkpoint_s=60.0))
    endpoint = f"127.0.0.1:{running.port}"
    try:
        assert cli.main(["verify", "tail-2", "--endpoint", endpoint, "--quiet"]) == 0
        err = capsys.readouterr().err
        assert "3 records: 2 verified, 0 failed, 1 not recomputable" in err
        assert "signed up to seq 3" in err  # signed at shutdown by the first server (same key)
    finally:
        running.stop(0)


def test_a_signing_key_given_by_path_is_used_and_a_bad_one_stops_the_start(tmp_path: Path) -> None:
    from lossd.server.audit import AuditStoreError

    key = Signer.load_or_create(tmp_path / "keys" / "lossd.key")  # e.g. a mounted secret
    config = ServerConfig(
        port=0,
        device="cpu",
        data_dir=str(tmp_path / "data"),
        audit_signing_key=str(tmp_path / "keys" / "lossd.key"),
    )
    running = create_server(config)
    try:
        assert running.audit_signer.key_id == key.key_id
        assert not (tmp_path / "data" / "audit-signing.key").exists()
    finally:
        running.stop(0)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(AuditStoreError, match=f"audit signing key {bad} cannot be read"):
        create_server(config.replace(audit_signing_key=str(bad)))
