"""The contract as a client in another language meets it: reflection, documented codes and limits,
field presence, and the small inconsistencies issue 16 found (each fails on the code before it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from lossd.client import AuditClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.functional import build_request
from lossd.server import registry
from lossd.server.app import create_server
from lossd.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "lossd" / "v1" / "lossd.proto"


def _reflect(channel: grpc.Channel, version: str, **request) -> rpb.ServerReflectionResponse:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([rpb.ServerReflectionRequest(**request)]), timeout=30))
    return response


def _comment(proto: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    for location in proto.source_code_info.location:
        if list(location.path) == path:
            return location.leading_comments
    return ""


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_serves_the_source_file_with_its_comments(endpoint: str, version: str):
    with grpc.insecure_channel(endpoint) as channel:
        response = _reflect(channel, version, file_by_filename="lossd/v1/lossd.proto")
        (raw,) = response.file_descriptor_response.file_descriptor_proto
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        assert proto.name == "lossd/v1/lossd.proto"
        service = next(i for i, s in enumerate(proto.service) if s.name == "LossService")
        # FileDescriptorProto field 6 is `service`; its comment is the one above the service.
        assert _comment(proto, [6, service]).strip() == "Computes losses and their gradients."
        request = next(i for i, m in enumerate(proto.message_type) if m.name == "ComputeRequest")
        assert "One loss evaluation." in _comment(proto, [4, request])
        # By symbol, the same file.
        by_symbol = _reflect(channel, version, file_containing_symbol="lossd.v1.LossService")
        assert by_symbol.file_descriptor_response.file_descriptor_proto[0] == raw
        listed = _reflect(channel, version, list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "lossd.v1.LossService",
            "lossd.v1.AuditService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        missing = _reflect(channel, version, file_containing_symbol="lossd.v1.Nope")
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_the_v1_reflection_file_describes_itself(endpoint: str):
    with grpc.insecure_channel(endpoint) as channel:
        response = _reflect(
            channel, "v1", file_containing_symbol="grpc.reflection.v1.ServerReflection"
        )
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        response.file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == "grpc.reflection.v1"
    (method,) = proto.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


def test_the_served_descriptor_is_the_checked_in_proto():
    """The descriptor set is what proto/generate.py makes from proto/: CI regenerates and diffs."""
    data = (ROOT / "client" / "_proto" / "lossd_v1_descriptor.binpb").read_bytes()
    (proto,) = descriptor_pb2.FileDescriptorSet.FromString(data).file
    assert {m.name for m in proto.message_type} == set(pb.DESCRIPTOR.message_types_by_name)


def test_the_proto_lists_exactly_the_input_kinds_the_server_sends():
    text = PROTO.read_text()
    block = text[text.index("message InputInfo") :]
    comment = block[: block.index("string kind = 2;")]
    documented = set(re.findall(r'"([a-z_]+)"', comment))
    assert documented == set(registry.INPUT_KINDS)
    served = {i.kind for s in registry.all_specs() for i in s.inputs}
    assert served <= documented


def test_the_proto_documents_codes_details_and_limits():
    text = PROTO.read_text()
    for code in (
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "DEADLINE_EXCEEDED",
        "UNAVAILABLE",
        "INTERNAL",
    ):
        assert f"// - {code}" in text or f"{code}:" in text, code
    assert "google.rpc.BadRequest" in text and "grpc-status-details-bin" in text
    for flag in ("--max-message-mb", "--max-rank", "--max-string-bytes", "--max-items"):
        assert flag in text
    assert "grpc.health.v1.Health" in text and "grpc.reflection.v1.ServerReflection" in text
    assert '"float32"' in text and '"4,3"' in text  # the hashed spellings


def test_describe_loss_names_the_request_field(client):
    with pytest.raises(LossdError) as info:
        client.describe("FocalLos")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.field == "name"  # DescribeLossRequest.name, not ComputeRequest.loss
    assert "FocalLoss" in str(info.value)


def test_an_unknown_family_is_invalid_argument_listing_the_families(endpoint: str):
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListLosses(pb.ListLossesRequest(family="mmdet"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fat, netspresso, visdet" in info.value.details()
        assert "'mmdet'" in info.value.details()
        assert stub.ListLosses(pb.ListLossesRequest(family="visdet"), timeout=30).losses
    cli = subprocess.run(
        [sys.executable, "-m", "lossd.server.cli", "losses", "--family", "mmdet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2
    assert "fat, netspresso, visdet" in cli.stderr and cli.stdout == ""


def _compute(endpoint: str, request: pb.ComputeRequest) -> grpc.RpcError:
    with grpc.insecure_channel(endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Compute(request, timeout=60)
    return info.value


def _mse_request(**params) -> pb.ComputeRequest:
    return build_request("mse", params, [torch.zeros(2), torch.ones(2)], {}, [])


def test_the_string_limit_counts_bytes_and_errors_quote_a_bounded_prefix():
    running = create_server(ServerConfig(port=0, device="cpu", max_string_bytes=4096))
    endpoint = f"127.0.0.1:{running.port}"
    try:
        # 2,000 characters, 6,000 UTF-8 bytes: over a 4,096-byte limit.
        error = _compute(endpoint, _mse_request(reduction="€" * 2000))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "6000 bytes" in error.details() and "--max-string-bytes" in error.details()
        assert "€€€€€" not in error.details()
        # Within the limit but wrong: the error quotes a bounded prefix, never the whole value.
        error = _compute(endpoint, _mse_request(reduction="x" * 4000))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x" * 200 not in error.details() and "characters in all" in error.details()
        assert len(error.details()) < 400
        request = _mse_request()
        request.loss = "y" * 3000
        error = _compute(endpoint, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert len(error.details()) < 400 and "3000 bytes in all" in error.details()
        request.loss = "z" * 5000  # the loss name is a string of the request like any other
        assert _compute(endpoint, request).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(0)


def test_an_audit_context_without_rank_is_recorded_as_unknown(tmp_path: Path):
    running = create_server(
        ServerConfig(port=0, device="cpu", audit="runs", audit_db=str(tmp_path / "a.sqlite3"))
    )
    endpoint = f"127.0.0.1:{running.port}"
    try:
        with grpc.insecure_channel(endpoint) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            only_run = _mse_request()
            only_run.audit.run_id = "presence"
            assert stub.Compute(only_run, timeout=60).audited
            given = _mse_request()
            given.audit.CopyFrom(pb.AuditContext(run_id="presence", step=0, rank=0, micro_batch=0))
            assert stub.Compute(given, timeout=60).audited
            bad = _mse_request()
            bad.audit.CopyFrom(pb.AuditContext(run_id="presence", rank=-7))
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(bad, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "audit.rank" in info.value.details()
        with AuditClient(endpoint, timeout=60) as reader:
            records = list(reader.records("presence"))
        unknown = [r for r in records if r["rank"] is None]
        zero = [r for r in records if r["rank"] == 0]
        assert len(unknown) == 1 and len(zero) == 1
        assert unknown[0]["micro_batch"] is None and unknown[0]["step"] is None
        assert zero[0]["micro_batch"] == 0 and zero[0]["step"] == 0
    finally:
        running.stop(0)
