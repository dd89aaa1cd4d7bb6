"""Walking a run's hash chain: every link from seq 1 to the head, then the chain as a whole
against the head table, the stored checkpoints and (optionally) the caller's checkpoint.

Each record's ``record_sha256`` covers its fields, its ``seq`` and its predecessor's digest
(``prev_sha256``), so, walking in seq order:
- a deleted record leaves a gap in seq (named: which seq, between which records);
- an inserted record repeats a seq, or its successor no longer links to it;
- a reordered pair changes the seq fields (their digests break) and the links;
- an edited record whose digest was recomputed no longer matches what its successor committed
  to (the last record has no successor: the head table and the checkpoints catch that).
The edited-without-recomputing case is the record's own digest (``RECORD_ALTERED``, verify.py).

A truncated tail or a chain rebuilt from scratch has intact links; only a checkpoint signed
before the change shows it: the chain must still hold the signed record at seq N.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from .records import GENESIS, Row
from .signing import Checkpoint, Signer
from .store import StoredCheckpoint


@dataclass
class Report:
    records: int = 0
    head_sha256: str = GENESIS
    broken_links: int = 0
    problems: list[str] = field(default_factory=list)
    signed_records: int = 0
    checkpoint_extended: bool = False
    unchained_records: int = 0


def _at(row: Row) -> str:
    return f"record {row.id} (seq {row.seq}, step {row.step}, request {row.request_id})"


def newest_signed(stored: list[StoredCheckpoint], signer: Signer | None) -> Checkpoint | None:
    """The largest stored checkpoint that the server's own key verifies (others, from another
    replica's key or forged, prove nothing either way)."""
    if signer is None:
        return None
    for cp in stored:
        checkpoint = Checkpoint(
            cp.run_id,
            cp.records,
            cp.head_sha256,
            cp.signed_at_ns,
            cp.key_id,
            base64.b64decode(cp.signature),
        )
        if cp.key_id == signer.key_id and checkpoint.verifies(signer.public):
            return checkpoint
    return None


class ChainWalk:
    """Feed it the run's records in chain order (``Store.chain``); ``link`` says what is wrong
    with each one's place in the chain ("" when nothing); then ``finish``.

    ``signed``: the newest checkpoint the server signed (``newest_signed``); ``given``: the
    caller's, its signature already checked by the caller."""

    def __init__(
        self, run_id: str, signed: Checkpoint | None = None, given: Checkpoint | None = None
    ) -> None:
        self.run_id = run_id
        self.report = Report()
        self.signed, self.given = signed, given
        self._prev: Row | None = None
        self._head = GENESIS
        self._expected = 1
        self._watch = {cp.records for cp in (signed, given) if cp is not None}
        self._digests: dict[int, str] = {}  # seq -> stored record_sha256, at the checkpoints

    def link(self, row: Row) -> str:
        if row.seq <= 0:
            self.report.unchained_records += 1
            return ""
        problem = ""
        prev = self._prev
        if row.seq < self._expected:
            problem = (
                f"{_at(row)} repeats seq {row.seq} of {_at(prev)}: a record was inserted"
                if prev is not None and prev.seq == row.seq
                else f"{_at(row)} is out of order (seq {row.seq} after {self._expected - 1})"
            )
            self.report.broken_links += 1
            return problem  # the chain goes on from the first record at this seq
        if row.seq > self._expected:
            missing = (
                f"seq {self._expected}"
                if row.seq == self._expected + 1
                else f"seq {self._expected}..{row.seq - 1}"
            )
            after = f"after {_at(prev)}" if prev is not None else "at the start of the run"
            problem = f"{missing} missing {after}, before {_at(row)}: records were deleted"
        elif row.prev_sha256 != self._head:
            before = _at(prev) if prev is not None else "the start of the chain"
            problem = (
                f"{_at(row)} does not link to {before}: it committed to prev_sha256 "
                f"{row.prev_sha256[:12]}..., the stored record has {self._head[:12]}... "
                "(that record was edited or replaced, or this one was moved)"
            )
        if problem:
            self.report.broken_links += 1
        self._prev, self._head, self._expected = row, row.record_sha256, row.seq + 1
        if row.seq in self._watch:
            self._digests[row.seq] = row.record_sha256
        self.report.records, self.report.head_sha256 = row.seq, row.record_sha256
        return problem

    def finish(self, head: tuple[int, str] | None) -> Report:
        """The chain as a whole: against the head table (``Store.chain_head``), the newest
        checkpoint the server signed, and the caller's checkpoint."""
        r = self.report
        if head is not None and head != (r.records, r.head_sha256) and head[0] > 0:
            r.problems.append(
                f"the chain head table says run {self.run_id!r} has {head[0]} records ending in "
                f"{head[1][:12]}..., the stored chain ends at seq {r.records} in {r.head_sha256[:12]}..."
                + (" (its tail was removed)" if head[0] > r.records else "")
            )
        if self.signed is not None:
            problem = self.extends(self.signed, "the newest checkpoint this server signed")
            if problem:
                r.problems.append(problem)
            else:
                r.signed_records = self.signed.records
        if self.given is not None:
            problem = self.extends(self.given, "the given checkpoint")
            if problem:
                r.problems.append(problem)
            else:
                r.checkpoint_extended = True
        return r

    def extends(self, cp: Checkpoint, what: str) -> str:
        """Why the walked chain does not extend ``cp`` ("" when it does)."""
        if cp.run_id != self.run_id:
            return f"{what} is for run {cp.run_id!r}, not {self.run_id!r}"
        stored = self._digests.get(cp.records)
        if cp.records == 0:
            return ""
        if stored is None:
            last = self.report.records
            gone = (
                f"record {cp.records} is"
                if last + 1 == cp.records
                else f"records {last + 1}..{cp.records} are"
            )
            if cp.records < last:  # a hole exactly at the signed seq
                gone = f"record {cp.records} is"
            return (
                f"{what} (key {cp.key_id}) covers {cp.records} records; the stored chain ends at "
                f"seq {last}: {gone} missing"
                + (" (the tail was truncated)" if cp.records > last else "")
            )
        if stored != cp.head_sha256:
            return (
                f"the record at seq {cp.records} is not the one {what} (key {cp.key_id}) signed: "
                f"{stored[:12]}... stored, {cp.head_sha256[:12]}... signed (the history was rewritten)"
            )
        return ""
