"""Where tensor bytes lie in a serialized message: what a prepared request (client/prepared.py)
and the server's prepared plans (server/prepared.py) both find the same way. A message is
serialized twice with each tensor's bytes replaced, once by zeros and once by its index + 1; the
bytes that differ are exactly the data, everything else (tags, lengths, dtypes, shapes) is the
same in both and fixed by the layout."""

from __future__ import annotations

import numpy as np


def constant_runs(
    zeros: np.ndarray, marked: np.ndarray, sizes: list[int]
) -> tuple[list[bytes], list[int]] | None:
    """The constant segments of two serializations that differ only in their tensors' bytes
    (zeros, and each tensor's index + 1; ``sizes``: each tensor's byte count), and which tensor's
    bytes lie between each two; None where the two do not line up so."""
    if len(zeros) != len(marked):
        return None
    where = np.flatnonzero(zeros != marked)  # exactly the data bytes: headers are the same
    starts = where[np.r_[True, np.diff(where) != 1]] if len(where) else where
    segments, order, at = [], [], 0
    for start in starts.tolist():
        index = int(marked[start]) - 1
        segments.append(zeros[at:start].tobytes())
        order.append(index)
        at = start + sizes[index]
    segments.append(zeros[at:].tobytes())
    if sorted(order) != [i for i, size in enumerate(sizes) if size]:
        return None
    return segments, order
