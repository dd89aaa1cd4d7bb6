"""Hardening against a hostile or unlucky world (issue 12): each test drives one attack or fault
against a running server on loopback and states what the server must do instead of failing."""

from __future__ import annotations

import logging

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client.functional import build_request
from lossd.server import registry
from lossd.server.registry import Input, LossSpec
from tests.support.opskit import running

# --------------------------------------------------------------------------------------------
# lossd's own bugs are INTERNAL, not "upstream raises the same"


def _index_bug(input):
    return input.sum() + input[input.numel() + 3]  # IndexError: a bug, not the caller's input


def _shape_bug(input):
    return (input @ torch.ones(input.numel() + 1)).sum()  # RuntimeError from torch: still a bug


@pytest.fixture()
def broken_losses():
    specs = [
        LossSpec(
            name=f"broken_{kind}",
            fn=fn,
            families=("fat",),
            summary="a deliberately broken loss (tests only)",
            inputs=(Input("input", differentiable=True),),
        )
        for kind, fn in (("index", _index_bug), ("shape", _shape_bug))
    ]
    for spec in specs:
        registry.register(spec)
    try:
        yield [s.name for s in specs]
    finally:
        for spec in specs:
            registry._REGISTRY.pop(spec.name, None)


def test_a_bug_in_a_loss_is_internal_naming_the_request_id_and_logged_with_its_traceback(
    broken_losses, caplog
):
    with running(metrics_port=-1) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0)
        try:
            for name in broken_losses:
                request = build_request(name, {}, (torch.ones(4),), {}, ["args[0]"])
                with (
                    caplog.at_level(logging.INFO, logger="lossd"),
                    pytest.raises(LossdError) as caught,
                ):
                    client.compute(request)
                assert caught.value.code == grpc.StatusCode.INTERNAL, caught.value
                assert request.request_id in caught.value.details
                assert "upstream" not in caught.value.details
                logged = [
                    r
                    for r in caplog.records
                    if r.levelno == logging.ERROR and request.request_id in r.getMessage()
                ]
                assert logged and logged[0].exc_info is not None, "no ERROR with its traceback"
            # A deliberate refusal (upstream's own raise, reproduced where upstream raises) stays
            # INVALID_ARGUMENT, and the server keeps serving.
            spec = registry.get("yolox_loss")
            args, kwargs, params = spec.make_example(torch.float32)
            args[0]["pred"][0] = torch.full_like(args[0]["pred"][0], float("nan"))
            with pytest.raises(LossdError) as caught:
                client.compute(build_request("yolox_loss", params, args, kwargs))
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "upstream raises the same" in caught.value.details
            assert client.compute(
                build_request("mse", {}, (torch.ones(3), torch.zeros(3)), {})
            ).request_id
        finally:
            client.close()
