"""``from_config``: build remote losses from the config formats the three trainers use.

Accepted, verbatim (a mapping, YAML text, or a path to a YAML file):

- NetsPresso Trainer: a ``losses:`` list of ``{criterion, weight, ...}`` entries, or a mapping
  holding ``losses`` or ``model.losses``. Evaluated in ONE RPC as the registry's ``losses``
  criteria list: the total is ``Σ weight_i · loss_i`` (``weight: null`` means 1.0) and each
  criterion's value comes back in ``last_result.components``.
- fat: ``{'loss': {'name': ..., ...}}``. As fat's ``LossFactory``: a missing ``loss`` or ``name``
  means ``cross_entropy``, names are lower-cased, and parameters fat does not forward for that
  loss are ignored (fat drops them silently; lossd warns).
- visdet / MMDetection: ``dict(type=..., ...)``; or a mapping of several such dicts
  (``loss_cls``, ``loss_bbox``, ``loss_centerness``, ... of a detector head, nested or not),
  which gives a ``RemoteLossSet`` of named losses sharing one connection.

Python config files are never executed: use YAML.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .connection import ConnectionOptions, LossClient
from .module import RemoteLoss

# What LossClient takes besides the endpoint: a loss set's one shared connection gets these.
_CONNECTION_OPTIONS = ConnectionOptions.names() - {"endpoint"}

# What fat's LossFactory forwards to each loss class (giovannipollo/fat@9abd3cf utils/loss.py).
FAT_FORWARDED: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("label_smoothing", "weight", "ignore_index"),
    "nll": ("weight", "ignore_index"),
    "mse": (),
    "l1": (),
    "smooth_l1": ("beta",),
    "bce": (),
    "bce_with_logits": ("pos_weight",),
    "kl_div": ("reduction", "log_target"),
    "sqr_hinge": (),
}


class RemoteLossSet(nn.ModuleDict):
    """Several named remote losses from one config (e.g. a detector head's loss_cls/loss_bbox)."""

    def close(self) -> None:
        for module in self.values():
            module.close()


def _load(cfg: Any) -> Any:
    if isinstance(cfg, Path) or (isinstance(cfg, str) and "\n" not in cfg and Path(cfg).is_file()):
        cfg = Path(cfg).read_text()
    if isinstance(cfg, str):
        cfg = yaml.safe_load(cfg)
    return cfg


def _is_loss_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("type"), str)


def _find_loss_dicts(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Mapping[str, Any]]:
    """``loss_*`` entries holding ``dict(type=...)``, searched through nested mappings."""
    found: dict[str, Mapping[str, Any]] = {}
    for key, value in cfg.items():
        if _is_loss_dict(value) and str(key).startswith("loss"):
            found[f"{prefix}{key}"] = value
        elif isinstance(value, Mapping):
            found.update(_find_loss_dicts(value, f"{prefix}{key}."))
    return found


def _netspresso_entries(cfg: Any) -> list[Mapping[str, Any]] | None:
    if isinstance(cfg, Sequence) and not isinstance(cfg, str):
        return list(cfg)
    if isinstance(cfg, Mapping):
        if isinstance(cfg.get("losses"), Sequence):
            return list(cfg["losses"])
        model = cfg.get("model")
        if isinstance(model, Mapping) and isinstance(model.get("losses"), Sequence):
            return list(model["losses"])
    return None


def from_config(
    cfg: Any, endpoint: str | Sequence[str] | None = None, **options: Any
) -> RemoteLoss | RemoteLossSet:
    """Build a ``RemoteLoss`` (or a ``RemoteLossSet``) from a trainer's loss config.

    ``options`` are passed to every ``RemoteLoss`` (``timeout``, ``max_message_mb``, ...).
    """
    cfg = _load(cfg)
    entries = _netspresso_entries(cfg)
    if entries is not None:
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "criterion" not in entry:
                raise ValueError(
                    f"losses[{i}]: expected a mapping with a 'criterion' key, got {entry!r}"
                )
        return RemoteLoss("losses", endpoint=endpoint, losses=[dict(e) for e in entries], **options)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"expected a loss config mapping, list or YAML, got {type(cfg).__name__}")
    if _is_loss_dict(cfg):
        params = {k: v for k, v in cfg.items() if k != "type"}
        return RemoteLoss(cfg["type"], endpoint=endpoint, **params, **options)
    named = _find_loss_dicts(cfg)
    if named:
        connection = {k: v for k, v in options.items() if k in _CONNECTION_OPTIONS}
        per_loss = {
            k: v for k, v in options.items() if k not in _CONNECTION_OPTIONS
        }  # transport, run_id, ...
        client = LossClient(endpoint, **connection)
        losses = RemoteLossSet()
        for key, loss_cfg in named.items():
            params = {k: v for k, v in loss_cfg.items() if k != "type"}
            losses[key.replace(".", "__")] = RemoteLoss(
                loss_cfg["type"], client=client, **params, **per_loss
            )
        return losses
    return _fat(cfg, endpoint, options)


def _fat(cfg: Mapping[str, Any], endpoint: Any, options: dict[str, Any]) -> RemoteLoss:
    loss = cfg.get("loss") or {}
    if not isinstance(loss, Mapping):
        raise ValueError(f"loss: expected a mapping with a 'name', got {loss!r}")
    name = str(loss.get("name") or "cross_entropy").lower()
    if name not in FAT_FORWARDED:
        raise ValueError(f"Unknown loss function: {name}. Available: {', '.join(FAT_FORWARDED)}")
    forwarded = FAT_FORWARDED[name]
    params = {k: v for k, v in loss.items() if k in forwarded and v is not None}
    dropped = sorted(k for k in loss if k != "name" and k not in forwarded)
    if dropped:
        warnings.warn(
            f"fat's loader does not forward {', '.join(dropped)} to {name}; ignored as upstream ignores them",
            UserWarning,
            stacklevel=3,
        )
    return RemoteLoss(name, endpoint=endpoint, **params, **options)
