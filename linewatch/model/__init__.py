"""The anomaly model: frozen backbone, pre-processing, scorer networks and the model file.

The runtime surface is re-exported here and imported lazily, so ``import linewatch.model``
stays cheap for processes that only need a submodule::

    from linewatch.model import Scorer
    scorer = Scorer.load("line.lwm", device="auto")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from linewatch.model.scorer import BackboneOnlyScorer, ScoreBatch, Scorer
    from linewatch.model.settings import ModelSettings, TrainSettings, variant_settings

__all__ = [
    "BackboneOnlyScorer",
    "ModelSettings",
    "ScoreBatch",
    "Scorer",
    "TrainSettings",
    "variant_settings",
]

_HOMES = {
    "BackboneOnlyScorer": "linewatch.model.scorer",
    "ScoreBatch": "linewatch.model.scorer",
    "Scorer": "linewatch.model.scorer",
    "ModelSettings": "linewatch.model.settings",
    "TrainSettings": "linewatch.model.settings",
    "variant_settings": "linewatch.model.settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'linewatch.model' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
