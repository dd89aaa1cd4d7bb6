"""fat trainer losses (giovannipollo/fat ``utils/loss.py``, ``LossFactory``).

fat builds one loss from ``config["loss"]``: eight stock ``torch.nn`` classes plus its own
``SqrHingeLoss``. Each function below mirrors the torch class fat instantiates: forward
arguments first, then the class's constructor parameters (torch 2.13 names and defaults, except
``kl_div``, whose default reduction is fat's ``'batchmean'``).

Deliberate differences from a plain ``torch.nn`` call, all on inputs upstream cannot handle:

* class indices out of range, ``bce`` values outside [0, 1], mismatched shapes or dtypes, and the
  other inputs upstream crashes on raise ``InvalidArgument`` before any kernel runs (a bad index
  must never become a CUDA device-side assert);
* class-weight / ``pos_weight`` tensors are moved to the input's device and dtype, and integer
  weight lists are accepted as floats. fat turns the YAML list with ``torch.tensor(list)``, so
  ``weight: [1, 2, 1]`` is int64 there and the first forward crashes ("expected scalar type
  Float but found Long"); lossd accepts it on purpose.

``cross_entropy`` is shared with NetsPresso Trainer: called with dicts it is NetsPresso's
``CrossEntropyLoss`` (see :func:`cross_entropy`).
"""

from __future__ import annotations

from . import classification, regression
from .classification import bce, bce_with_logits, cross_entropy, nll, sqr_hinge
from .regression import kl_div, l1, mse, smooth_l1

SPECS = (*classification.SPECS, *regression.SPECS)

__all__ = [
    "SPECS",
    "bce",
    "bce_with_logits",
    "cross_entropy",
    "kl_div",
    "l1",
    "mse",
    "nll",
    "smooth_l1",
    "sqr_hinge",
]
