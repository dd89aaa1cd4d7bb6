"""lossd client: call the lossd loss service as if it were a local torch loss.

from lossd.client import RemoteLoss
crit = RemoteLoss("FocalLoss", gamma=2.0, alpha=0.25, endpoint="127.0.0.1:50051")
loss = crit(logits, labels, avg_factor=4.0)
loss.backward()
"""

from .audit import AuditClient, audit_run
from .config import RemoteLossSet, from_config
from .errors import LossdError
from .functional import LossClient, RemoteResult, remote_loss
from .module import RemoteLoss

__all__ = [
    "AuditClient",
    "LossClient",
    "LossdError",
    "RemoteLoss",
    "RemoteLossSet",
    "RemoteResult",
    "audit_run",
    "from_config",
    "remote_loss",
]
