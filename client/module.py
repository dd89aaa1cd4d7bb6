"""``RemoteLoss``: an ``nn.Module`` that computes an upstream loss on a lossd server."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._proto import lossd_pb2 as pb
from .audit import StepCounter, current_run, make_context
from .connection import ConnectionOptions, LossClient
from .functional import COMPILE_BREAK, RemoteResult, reject_numpy, remote_loss
from .schema import check_call, check_params
from .transport import DEFAULT_CHUNK_THRESHOLD, Transport
from .wire import codec
from .wire.audit import check_audit_fields


class RemoteLoss(nn.Module):
    """Drop-in replacement for an upstream loss module, computed by a lossd server.

    Args:
        name: registry name, e.g. ``"cross_entropy"``, ``"FocalLoss"``, ``"yolox_loss"``
            (``lossd losses`` lists them).
        endpoint, timeout, max_message_mb, token, tls, tls_ca, tls_cert, tls_key,
            tls_server_name, retries: how to connect, the fields of ``ConnectionOptions``
            (``endpoint`` defaults to ``$LOSSD_ENDPOINT``, else ``127.0.0.1:50051``; ``timeout``
            is each call's deadline in seconds, None: none).
        client: share an existing ``LossClient`` (and its channel) instead of opening one; the
            connection keywords are then ignored.
        transport: how calls travel. ``"auto"`` (default): calls whose tensors add up to
            ``chunk_threshold`` bytes or more go in chunks (``ComputeChunked``: no message limit,
            about twice as fast for large tensors), smaller ones as unary ``Compute``.
            ``"unary"`` and ``"chunked"`` force one.
        chunk_threshold: bytes of tensors in one call from which ``"auto"`` sends chunks.
        run_id: audit run of this module's calls (the server records each call: see the
            README's "Audit trail"). None: the run of an enclosing ``lossd.client.audit_run``
            block, if any; else calls are not audited (unless the server runs ``--audit all``).
        tags: labels recorded with each audited call (merged over the ``audit_run``'s).
        rank: distributed rank recorded with each call (None: torch.distributed's, else -1).
        micro_batch: gradient-accumulation index within the step (None: -1, unknown); may be
            reassigned between calls (``crit.micro_batch = k``).
        step: first step number. Each call takes the current step and advances it by one,
            until you assign ``crit.step = i``; from then on calls use the assigned step as is
            (several losses or micro-batches of one training step share it).
        **params: the upstream constructor's parameters, e.g. ``gamma=2.0``.

    ``forward`` takes exactly the upstream forward's arguments and returns the loss on the
    inputs' device. After each call, ``last_result`` holds what the server said besides the value:
    components that upstream drops (YOLOX iou/obj/cls/l1, ...), notes, the non-finite flag,
    timings and the request id.
    """

    def __init__(
        self,
        name: str,
        *,
        client: LossClient | None = None,
        transport: str = "auto",
        chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        rank: int | None = None,
        micro_batch: int | None = None,
        step: int | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        connection = {key: params.pop(key) for key in ConnectionOptions.names() & params.keys()}
        codec.encode_map(params)  # fail now, not at the first step, on a value that cannot travel
        check_audit_fields(run_id, tags)
        self.run_id = run_id or None
        self.tags = dict(tags or {})
        self.rank = rank
        self.micro_batch = micro_batch
        self._steps = StepCounter(step or 0)
        self.name = name
        self.params = dict(params)
        self._owns_client = client is None
        self.client = client or LossClient(**connection)
        self.last_result: RemoteResult | None = None
        self._params_checked = False
        self.transport = Transport(self.client, transport, chunk_threshold=chunk_threshold)

    @torch.compiler.disable(reason=COMPILE_BREAK)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # One DescribeLoss per client: a misspelled parameter or a target of the wrong dtype or
        # shape fails before any tensor travels (the server checks everything again).
        reject_numpy(self.name, args, kwargs)  # before any RPC: a TypeError naming the argument
        info = self.client.describe(self.name)
        if not self._params_checked:
            check_params(info, self.params)
            self._params_checked = True
        signature = check_call(info, self.params, args, kwargs)
        # remote_loss undecorated: this frame already runs outside torch.compile (recursively).
        value, result = remote_loss.__wrapped__(
            self.client,
            self.name,
            self.params,
            args,
            kwargs,
            audit=self._audit_context(),
            transport=self.transport,
            _signature=signature,
        )
        self.__dict__["last_result"] = (
            result  # a plain attribute: not nn.Module's __setattr__ (~3 us)
        )
        return value

    @property
    def components(self) -> dict[str, Any]:
        """Terms of the last evaluation that upstream computes and drops."""
        return self.last_result.components if self.last_result else {}

    @property
    def step(self) -> int:
        """The step the next audited call of this module gets (its own run id only; inside an
        ``audit_run`` block without one, the block numbers the calls: ``run.step = i``)."""
        return self._steps.value

    @step.setter
    def step(self, value: int) -> None:
        self._steps.value = value

    def _audit_context(self) -> pb.AuditContext | None:
        """The AuditContext of the next call: this module's run, else the enclosing audit_run's."""
        if self.run_id:
            return make_context(
                self.run_id, self._steps.take(), self.rank, self.micro_batch, self.tags
            )
        run = current_run()
        if run is None:
            return None
        rank = self.rank if self.rank is not None else run.rank
        return make_context(
            run.run_id, run.counter.take(), rank, self.micro_batch, {**run.tags, **self.tags}
        )

    def describe(self) -> pb.LossInfo:
        """The server's declaration of this loss: parameters, inputs, reference."""
        return self.client.describe(self.name)

    def close(self) -> None:
        self.transport.close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RemoteLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name!r}{', ' + params if params else ''}, endpoint={self.client.target!r}"

    def __getstate__(self) -> dict[str, Any]:
        # Channels cannot be copied or pickled; a copy opens its own on first use.
        # The state holds plain values only (a Transport holds locks): __setstate__ rebuilds them.
        state = self.__dict__.copy()
        state["client"] = self.client.options
        state["_owns_client"] = True
        transport = self.transport
        state["transport"] = {
            "mode": transport.mode,
            "chunk_threshold": transport.chunk_threshold,
            "chunk_bytes": transport.chunk_bytes,
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        client = LossClient(options=state["client"])
        options = state["transport"]
        state["client"] = client
        state["transport"] = Transport(
            client,
            options["mode"],
            chunk_threshold=options["chunk_threshold"],
            chunk_bytes=options["chunk_bytes"],
        )
        self.__dict__.update(state)
