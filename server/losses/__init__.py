"""Every served loss, registered here by explicit import: read this file to see the registry.

Each family module defines plain torch functions and a ``SPECS`` tuple declaring them.
"""

from __future__ import annotations

from .. import registry
from . import detr, fat, netspresso, pidnet, retinanet, rtmcc, visdet, yolofastest, yolov9, yolox

FAMILY_MODULES = (
    fat,
    netspresso,
    yolox,
    yolofastest,
    retinanet,
    pidnet,
    rtmcc,
    visdet,
    yolov9,
    detr,
)

for _module in FAMILY_MODULES:
    for _spec in _module.SPECS:
        registry.register(_spec)
