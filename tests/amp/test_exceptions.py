"""Upstream's exception classes through the RPC: where upstream raises ValueError, IndexError,
RuntimeError or AssertionError for an input, the client raises a LossdError that is also that
class (``except ValueError`` written for the upstream module keeps working), with its
``.code``, ``.details`` and ``.field``."""

from __future__ import annotations

import grpc
import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossdError, RemoteLoss
from lossd.client.errors import LossdIndexError, LossdValueError


@pytest.mark.parametrize("transport", ["unary", "chunked"])
def test_except_valueerror_catches_mmdets_avg_factor_with_reduction_sum(endpoint, transport):
    pred, target = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with RemoteLoss("FocalLoss", endpoint=endpoint, transport=transport) as crit:
        try:
            crit(pred, target, avg_factor=2.0, reduction_override="sum")
        except ValueError as error:  # what code written for mmdet's FocalLoss catches
            caught = error
        else:
            pytest.fail("no error")
    assert isinstance(caught, LossdError) and isinstance(caught, LossdValueError)
    assert caught.code == grpc.StatusCode.INVALID_ARGUMENT
    assert 'avg_factor can not be used with reduction="sum"' in caught.details
    assert caught.field and "avg_factor" in caught.field


def test_a_class_index_out_of_range_is_an_indexerror_as_in_torch(endpoint):
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(IndexError):
        F.cross_entropy(x, t)
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit, pytest.raises(IndexError) as info:
        crit(x, t)
    assert isinstance(info.value, LossdIndexError) and info.value.field == "args[1]"


def test_a_one_hot_class_out_of_range_is_a_runtimeerror_as_upstream(endpoint):
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError):
        F.one_hot(t, 3)  # fat's SqrHingeLoss builds its +-1 code this way
    with RemoteLoss("sqr_hinge", endpoint=endpoint) as crit, pytest.raises(RuntimeError) as info:
        crit(x, t)
    assert type(info.value).__name__ == "LossdRuntimeError"


def test_a_dfl_distance_past_the_last_bin_is_an_indexerror(endpoint):
    pred, target = torch.randn(2, 5), torch.tensor([1.5, 4.0])
    with (
        RemoteLoss("DistributionFocalLoss", endpoint=endpoint) as crit,
        pytest.raises(IndexError) as info,
    ):
        crit(pred, target)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refusal_with_no_upstream_class_stays_a_plain_lossderror(endpoint):
    with (
        RemoteLoss("mse", endpoint=endpoint, reduction="bogus") as crit,
        pytest.raises(LossdError) as info,
    ):
        crit(torch.randn(3), torch.randn(3))
    assert type(info.value) is LossdError and not isinstance(info.value, ValueError)
