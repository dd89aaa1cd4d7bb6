"""Reading the trail is a privilege: with --auth-tokens, AuditService needs the audit-read role;
the record names the authenticated principal that computed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import AuditClient, LossdError, RemoteLoss
from lossd.server.app import create_server
from lossd.server.audit import cli
from lossd.server.config import ServerConfig

COMPUTE = "compute-token-0123456789abcdef"
AUDIT = "audit-token-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("access")
    tokens = d / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                COMPUTE: {"principal": "trainer-a", "roles": ["compute"]},
                "sha256:" + hashlib.sha256(AUDIT.encode()).hexdigest(): {
                    "principal": "auditor",
                    "roles": ["audit-read"],
                },
            }
        )
    )
    tokens.chmod(0o600)
    running = create_server(
        ServerConfig(
            port=0, device="cpu", auth_tokens=str(tokens), audit_db=str(d / "audit.sqlite3")
        )
    )
    endpoint = f"127.0.0.1:{running.port}"
    crit = RemoteLoss(
        "cross_entropy", endpoint=endpoint, token=COMPUTE, timeout=60, run_id="secured"
    )
    crit(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 1])).backward()
    assert crit.last_result.audited
    crit.close()
    yield endpoint
    running.stop(0)


def test_a_compute_token_is_denied_the_audit_rpcs(secured: str) -> None:
    with AuditClient(secured, token=COMPUTE, timeout=30) as reader:
        with pytest.raises(LossdError) as caught:
            reader.list_runs()
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "audit-read" in caught.value.details and "trainer-a" in caught.value.details
        with pytest.raises(LossdError) as streamed:
            list(reader.records("secured"))
        assert streamed.value.code == grpc.StatusCode.PERMISSION_DENIED
    with AuditClient(secured, timeout=30) as anonymous, pytest.raises(LossdError) as caught:
        anonymous.list_runs()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_an_audit_read_token_reads_the_trail_and_sees_the_principal(secured: str) -> None:
    with AuditClient(secured, token=AUDIT, timeout=30) as reader:
        assert [r.run_id for r in reader.list_runs()] == ["secured"]
        (record,) = reader.records("secured")
    assert record["principal"] == "trainer-a" and record["peer"].startswith("ipv4:127.0.0.1:")


def test_the_cli_takes_the_token_and_reports_a_denial(
    secured: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    assert cli.main(["runs", "--endpoint", secured, "--token", COMPUTE]) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert cli.main(["runs", "--endpoint", secured, "--token", AUDIT]) == 0
    assert "secured" in capsys.readouterr().out


def test_a_server_without_a_trail_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    running = create_server(ServerConfig(port=0, device="cpu", audit="none"))
    try:
        assert cli.main(["runs", "--endpoint", f"127.0.0.1:{running.port}"]) == 2
    finally:
        running.stop(0)
    err = capsys.readouterr().err
    assert "UNIMPLEMENTED" in err and "keeps no audit trail" in err
