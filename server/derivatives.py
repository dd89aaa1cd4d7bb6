"""The derivatives one evaluation returns: first-order gradients (vector-Jacobian products), a
batch of them (the caller's backward under ``vmap``), and second-order products (the caller's
double backward and forward-mode AD).

Every request names input paths (``grad_paths``); the server differentiates the upstream loss
with torch autograd, so the numbers are upstream's autograd numbers:

- first order: ``d loss / d x_i``, contracted with ``grad_output`` when one is given (needed for a
  non-scalar loss; a scalar loss's gradients come back with the value);
- batched: ``grad_output`` has an extra leading dimension; one product per row, in order;
- second order (``grad_grads`` v_i given): the gradients of ``sum_i <g_i, v_i>``, where
  ``g_i = d loss / d x_i`` contracted with ``grad_output``, with respect to every ``x_j`` and, under
  the path ``grad_output``, to ``grad_output`` itself (that one is the Jacobian-vector product
  ``J v``: forward-mode AD).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidArgument

GRAD_OUTPUT = "grad_output"  # the path under which d/d(grad_output) comes back


def gradients(
    value: Any,
    wanted: dict[str, Tensor],
    grad_output: Tensor | None,
    device: torch.device,
    *,
    batched: bool = False,
    grad_grads: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    if not wanted:
        return {}
    if not isinstance(value, Tensor):
        raise InvalidArgument(
            f"gradients need a tensor loss value, the loss returned {type(value).__name__}",
            field="grad_paths",
        )
    if grad_output is None:
        if batched:
            raise InvalidArgument("grad_output_batched needs a grad_output", field="grad_output")
        if value.numel() != 1 and not grad_grads:
            # Non-scalar loss: the caller asks again with grad_output (its backward pass).
            return {}
    else:
        grad_output = _check_grad_output(grad_output, value, device, batched)
    if grad_grads:
        return _second_order(value, wanted, grad_output, grad_grads, device)
    if not value.requires_grad:
        return {}  # the value does not depend on any requested input
    paths = list(wanted)
    leaves = [wanted[p] for p in paths]
    if not batched:
        found = torch.autograd.grad(value, leaves, grad_outputs=grad_output, allow_unused=True)
        return {p: _dense(g) for p, g in zip(paths, found) if g is not None}
    rows = [
        torch.autograd.grad(value, leaves, grad_outputs=row, allow_unused=True, retain_graph=True)
        for row in grad_output
    ]
    return {
        p: torch.stack([r[i] for r in rows]).detach()
        for i, p in enumerate(paths)
        if rows and rows[0][i] is not None
    }


def _check_grad_output(
    grad_output: Tensor, value: Tensor, device: torch.device, batched: bool
) -> Tensor:
    shape = tuple(grad_output.shape[1:] if batched else grad_output.shape)
    if (batched and grad_output.dim() == 0) or shape != tuple(value.shape):
        what = "(B, *loss shape)" if batched else "the loss output's"
        raise InvalidArgument.expected(
            GRAD_OUTPUT,
            f"shape {what}: loss shape {list(value.shape)}",
            f"shape {list(grad_output.shape)}",
        )
    if not grad_output.is_floating_point():
        raise InvalidArgument.expected(
            GRAD_OUTPUT, "a floating-point tensor", str(grad_output.dtype)
        )
    return grad_output.to(device=device, dtype=value.dtype)


def _second_order(
    value: Tensor,
    wanted: dict[str, Tensor],
    grad_output: Tensor | None,
    grad_grads: Mapping[str, Tensor],
    device: torch.device,
) -> dict[str, Tensor]:
    for i, path in enumerate(grad_grads):
        if path not in wanted:
            raise InvalidArgument(
                f"grad_grads names {path!r}, which is not one of grad_paths ({', '.join(wanted)})",
                field=f"grad_grads[{i}]",
            )
        if tuple(grad_grads[path].shape) != tuple(wanted[path].shape):
            raise InvalidArgument.expected(
                f"grad_grads[{i}]",
                f"the shape of {path}, {list(wanted[path].shape)}",
                list(grad_grads[path].shape),
            )
    if grad_output is None:
        grad_output = torch.ones_like(value)
    grad_output = grad_output.detach().requires_grad_(True)
    paths = list(wanted)
    leaves = [wanted[p] for p in paths]
    if not value.requires_grad:
        return {}
    first = torch.autograd.grad(
        value, leaves, grad_outputs=grad_output, create_graph=True, allow_unused=True
    )
    terms = [
        (g, grad_grads[p].to(device=device, dtype=g.dtype))
        for p, g in zip(paths, first)
        if g is not None and p in grad_grads and g.requires_grad
    ]
    if not terms:
        return {}  # the gradients are constant: every second derivative is zero
    found = torch.autograd.grad(
        [g for g, _ in terms],
        [*leaves, grad_output],
        grad_outputs=[v for _, v in terms],
        allow_unused=True,
    )
    return {p: _dense(g) for p, g in zip([*paths, GRAD_OUTPUT], found) if g is not None}


def _dense(grad: Tensor) -> Tensor:
    # Some second derivatives are torch's lazy zero tensors (L1's), which have no bytes to send.
    if grad._is_zerotensor():
        return torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    return grad.detach()
