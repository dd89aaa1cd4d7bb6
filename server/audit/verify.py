"""Re-verifying audit records: integrity, input digests, and recomputation.

For each record, in this order (the first failure decides the status):
1. the record's own SHA-256 over its stored fields (an edited row is RECORD_ALTERED);
2. for captured records, each stored input decompressed and re-digested (INPUT_MISMATCH names
   the input's path when it is missing or its bytes no longer match);
3. the loss recomputed on the recorded device in the recorded dtypes, and on CPU in float64.
   Both report the maximum relative deviation |a - b| / max(|a|, |b|) (0 when equal,
   NaN == NaN) over the value's elements and the components. The same-device recomputation must
   reproduce the record within the tolerance, relatively (it normally reproduces it exactly).
   The float64 one measures the float32 (or half) arithmetic's own error, which is absolute, not
   relative, for a loss near zero (a float32 cross-entropy of 1e-5 is the difference of two
   numbers near 10), so it is held to the tolerance relative to max(1, |a|, |b|): a value that
   differs from the exact one by more than rounding fails, a converged loss does not (DEVIATION).
Records whose inputs are not in the store can only pass step 1 (NOT_CAPTURED). A record that says
its inputs were not captured is still recomputed when every one of them is in the store (the
run's last call, stored once the run went idle; or the same tensor stored for another record):
the record's input digests authenticate them.

``verify_run`` walks the whole run in chain order (chain.py), so a broken link anywhere in the
run is reported (CHAIN_BROKEN, naming the record and the gap) even when a step selection leaves
that record out; only the selected records are recomputed.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lossd.client.wire.codec import iter_tensors, map_tensors

from ..engine import Engine
from .capture import restore
from .chain import ChainWalk, Report, newest_signed
from .records import Row, from_json, is_oversized, scalar_of
from .signing import Checkpoint, Signer
from .store import Selector, Store

DEFAULT_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}

OK, DEVIATION, INPUT_MISMATCH, RECORD_ALTERED, NOT_CAPTURED, ERROR, CHAIN_BROKEN = (
    "OK", "DEVIATION", "INPUT_MISMATCH", "RECORD_ALTERED", "NOT_CAPTURED", "ERROR", "CHAIN_BROKEN",
)  # fmt: skip


@dataclass
class Outcome:
    row: Row
    status: str
    dev_float64: float = math.nan
    dev_device: float = math.nan
    tolerance: float = 0.0
    message: str = ""


def tolerance_for(dtype: str, requested: float) -> float:
    return requested if requested > 0 else DEFAULT_TOLERANCE.get(dtype, 1e-4)


def rel_dev(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


class Verifier:
    """Verifies rows of one store; engines per device are created once and reused."""

    def __init__(self, store: Store, bounded: Any = None) -> None:
        self.store = store
        self._engines: dict[str, Engine] = {}
        # LossServicer.bounded: each recomputation takes a worker slot and its memory, as Compute.
        self.bounded = bounded or (lambda *_args: contextlib.nullcontext())

    def engine(self, device: str) -> Engine | None:
        if device not in self._engines:
            dev = torch.device(device)
            if dev.type == "cuda" and (
                not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
            ):
                return None
            self._engines[device] = Engine(dev)
        return self._engines[device]

    def verify(
        self, rows: Iterator[Row], tolerance: float = 0.0, conn: Any = None
    ) -> Iterator[Outcome]:
        """``conn``: a read connection of the store (``store.reader()``) to fetch inputs with."""
        for row in rows:
            yield self.checked(row, tolerance, conn)

    def checked(self, row: Row, tolerance: float = 0.0, conn: Any = None) -> Outcome:
        try:
            return self.verify_one(row, tolerance, conn)
        except Exception as exc:  # noqa: BLE001 - one broken record must not stop the run's report
            return Outcome(
                row,
                ERROR,
                tolerance=tolerance_for(row.dtype, tolerance),
                message=f"{_name(row)}: {type(exc).__name__}: {exc}",
            )

    def verify_run(
        self,
        sel: Selector,
        tolerance: float = 0.0,
        conn: Any = None,
        signer: Signer | None = None,
        given: Checkpoint | None = None,
    ) -> Iterator[Outcome | Report]:
        """The selected records' outcomes and every broken link of the run, in chain order;
        then the run's chain ``Report`` (last)."""
        walk = ChainWalk(
            sel.run_id, newest_signed(self.store.checkpoints(sel.run_id, conn), signer), given
        )
        for row in self.store.chain(sel.run_id, conn):
            problem = walk.link(row)
            chosen = sel.matches(row)
            if not (chosen or problem):
                continue
            if not chosen:
                yield Outcome(
                    row,
                    CHAIN_BROKEN,
                    tolerance=tolerance_for(row.dtype, tolerance),
                    message=problem,
                )
                continue
            outcome = self.checked(row, tolerance, conn)
            if problem:
                if outcome.status != RECORD_ALTERED:
                    outcome.status = CHAIN_BROKEN
                outcome.message = problem + (f"; {outcome.message}" if outcome.message else "")
            yield outcome
        yield walk.finish(self.store.chain_head(sel.run_id, conn))

    def verify_one(self, row: Row, tolerance: float = 0.0, conn: Any = None) -> Outcome:
        tol = tolerance_for(row.dtype, tolerance)
        if row.digest() == row.record_sha256:
            return self._recompute(row, tol, conn)
        # An edited row: still recompute when possible, to say how far the stored value is off.
        try:
            found = self._recompute(row, tol, conn)
            seen = f"; recomputation: {found.status}" + (
                f" ({found.message.split(': ', 1)[-1]})" if found.message else ""
            )
        except Exception as exc:  # noqa: BLE001 - the edit may have broken the row's JSON
            found = Outcome(row, ERROR, tolerance=tol)
            seen = f"; recomputation failed: {type(exc).__name__}: {exc}"
        return Outcome(
            row,
            RECORD_ALTERED,
            found.dev_float64,
            found.dev_device,
            tol,
            f"{_name(row)}: stored fields do not match record_sha256 (the row was edited){seen}",
        )

    def _recompute(self, row: Row, tol: float, conn: Any = None) -> Outcome:
        """Steps 2 and 3: the stored inputs against their digests, then the recomputation."""
        inputs = json.loads(row.inputs)
        if is_oversized(row.params) or is_oversized(row.call):
            return Outcome(
                row,
                NOT_CAPTURED,
                tolerance=tol,
                message=f"{_name(row)}: its parameters or call were too large to store (kept by "
                "digest); integrity checked, not recomputed",
            )
        blobs = self.store.blobs((i["sha256"] for i in inputs), conn)
        later = not row.captured and bool(inputs) and all(i["sha256"] in blobs for i in inputs)
        if not row.captured and not later:
            why = (
                f"chosen for capture ({row.capture}) but not stored (--audit-capture-max-mb reached)"
                if row.capture
                else "inputs not captured (not in the sample)"
            )
            return Outcome(
                row,
                NOT_CAPTURED,
                tolerance=tol,
                message=f"{_name(row)}: {why}; integrity checked, not recomputed",
            )
        tensors: dict[str, Tensor] = {}
        for i in inputs:
            found = blobs.get(i["sha256"])
            if found is None:
                return Outcome(
                    row,
                    INPUT_MISMATCH,
                    tolerance=tol,
                    message=f"{_name(row)}: input {i['path']} (sha256 {i['sha256'][:12]}...) is missing from the store",
                )
            tensor, digest = restore(found[1], found[0], i["dtype"], i["shape"])
            if digest != i["sha256"]:
                return Outcome(
                    row,
                    INPUT_MISMATCH,
                    tolerance=tol,
                    message=f"{_name(row)}: stored input {i['path']} no longer matches its digest {i['sha256'][:12]}...",
                )
            tensors[i["path"]] = tensor
        params = {k: from_json(v, tensors.__getitem__) for k, v in json.loads(row.params).items()}
        call = json.loads(row.call)
        args = from_json(call["args"], tensors.__getitem__)
        kwargs = {k: from_json(v, tensors.__getitem__) for k, v in call["kwargs"].items()}
        recorded_value = _value_numbers(json.loads(row.value))
        recorded_components = json.loads(row.components)

        cpu = self._engines.setdefault("cpu", Engine("cpu"))
        widen = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
        wide_call = (
            map_tensors(params, widen),
            map_tensors(args, widen),
            map_tensors(kwargs, widen),
        )
        with self.bounded(row.loss, *wide_call):
            wide = cpu.evaluate(row.loss, *wide_call)
        dev64, scaled64 = _deviation(
            recorded_value, recorded_components, wide.value, wide.components
        )
        device_engine = self.engine(row.device)
        notes = []
        if later:  # the run's last call (recorder.py), or the same tensors stored for another
            notes.append("recomputed from inputs stored after the record was written")
        if device_engine is None:
            dev_dev = math.nan
            notes.append(f"device {row.device} is absent here: recomputed in float64 only")
        else:
            with self.bounded(row.loss, params, args, kwargs):
                same = device_engine.evaluate(row.loss, params, args, kwargs)
            dev_dev = _deviation(recorded_value, recorded_components, same.value, same.components)[
                0
            ]
        failed = []
        if not (math.isnan(dev_dev) or dev_dev <= tol):
            failed.append(
                f"the recomputation on {row.device} in {row.dtype or 'the recorded dtypes'} deviates by {dev_dev:.3g} > tolerance {tol:g}"
            )
        if not scaled64 <= tol:
            failed.append(
                f"the float64 CPU recomputation deviates by {dev64:.3g} (relative; {scaled64:.3g} on the scale max(1, |value|)) > tolerance {tol:g}"
            )
        if failed:
            return Outcome(
                row, DEVIATION, dev64, dev_dev, tol, f"{_name(row)}: " + "; ".join(failed + notes)
            )
        return Outcome(row, OK, dev64, dev_dev, tol, "; ".join(notes))


def _name(row: Row) -> str:
    return f"record {row.id} (run {row.run_id!r}, step {row.step}, {row.loss}, request {row.request_id})"


def _value_numbers(form: Any) -> list[float] | None:
    """The recorded value's elements (None when only its digest was kept)."""
    numbers: list[float] = []

    def walk(obj: Any) -> bool:
        if isinstance(obj, dict) and "tensor" in obj:
            data = obj["tensor"].get("data")
            if data is None:
                return False
            numbers.extend(float(x) for x in data)
            return True
        if isinstance(obj, dict):
            inner = obj.get("tuple", obj.get("dict"))
            items = inner.values() if isinstance(inner, dict) else (inner or [])
            return all(walk(v) for v in items)
        if isinstance(obj, list):
            return all(walk(v) for v in obj)
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            numbers.append(float(obj))
        return True

    return numbers if walk(form) else None


def _deviation(
    recorded: list[float] | None,
    recorded_components: dict[str, float],
    value: Any,
    components: dict[str, Tensor],
) -> tuple[float, float]:
    """(largest relative deviation, largest deviation relative to max(1, |a|, |b|))."""
    worst = scaled = 0.0
    if recorded is not None:
        fresh = [
            float(x)
            for _, t in iter_tensors(value, "v")
            for x in t.detach().double().reshape(-1).cpu().tolist()
        ]
        if not isinstance(value, Tensor) and isinstance(value, (int, float)):
            fresh = [float(value)]
        if len(fresh) != len(recorded):
            return math.inf, math.inf
        for a, b in zip(recorded, fresh):
            worst, scaled = max(worst, rel_dev(a, b)), max(scaled, scaled_dev(a, b))
    for name, a in recorded_components.items():
        b = scalar_of(components[name]) if name in components else math.nan
        worst, scaled = max(worst, rel_dev(float(a), b)), max(scaled, scaled_dev(float(a), b))
    return worst, scaled


def scaled_dev(a: float, b: float) -> float:
    """|a - b| / max(1, |a|, |b|): relative for |values| >= 1, absolute below."""
    rel = rel_dev(a, b)
    if rel == 0.0 or math.isinf(rel):
        return rel
    return abs(a - b) / max(1.0, abs(a), abs(b))
