"""The session's XGBoost cost model: MetaSchedule's, retrained by the session's own data.

MetaSchedule's adaptive training retrains the model only once its data has grown by a fifth since the
last training. That suits a model that starts empty. A model pre-trained on a seed's records (a
resumed log, ``--from-log``, the schedule store) starts with hundreds of them: pre-trained on a
mobilenet_v2 session's 499 records, it would not retrain until about 100 of the new session's trials,
so the whole first pass and the first scheduler-guided batches were chosen by a model that had never
seen a timing of this model's kernels. Here the fifth counts the session's own records only: a seeded
session retrains as often as a cold one does, with the seed's records as the rest of its data.
"""

from __future__ import annotations

import math
import os
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.cost_model import XGBModel
from tvm.s_tir.meta_schedule.feature_extractor import PerStoreFeature

# MetaSchedule's rule: retrain once the data has grown by this share since the last training.
RETRAIN_GROWTH = 1 / 5


@derived_object
class SessionXGBModel(XGBModel._cls):  # type: ignore[name-defined]
    """XGBModel whose adaptive training counts the records added after :meth:`pretrain` only.

    ``pretrained`` is how many records the seed gave; ``trainings`` how often the booster was (re)trained,
    for the session log and the tests."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pretrained = 0
        self.trained_own = 0  # the session's own records at the last training
        self.trainings = 0

    def pretrain(self, groups: list[tuple[Any, list[Any], list[Any]]]) -> int:
        """Add each group's ``(tune context, measure candidates, runner results)`` and train once on
        all of them. Returns the records used; later updates retrain by the session's own growth."""
        used = 0
        for position, (context, candidates, results) in enumerate(groups):
            self._update(context, candidates, results, train=position == len(groups) - 1)
            used += len(candidates)
        self.pretrained = self.data_size
        self.trained_own = 0
        return used

    def update(self, context: Any, candidates: list[Any], results: list[Any]) -> None:
        own = self.data_size - self.pretrained + len(candidates)
        grown = own - self.trained_own >= self.trained_own * RETRAIN_GROWTH
        if self._update(context, candidates, results, train=grown):
            self.trained_own = self.data_size - self.pretrained

    def _update(self, context: Any, candidates: list[Any], results: list[Any], train: bool) -> bool:
        """MetaSchedule's update, training when ``train`` says so. True if the booster was retrained."""
        # MetaSchedule's update adds the records, then retrains unless adaptive training says the data
        # has not grown enough since ``last_train_size``: the decision is made here and passed down.
        self.adaptive_training = not train
        if not train:
            self.last_train_size = math.inf  # any growth is below a fifth of it: no training
        before = self.booster
        try:
            super().update(context, candidates, results)
        finally:
            self.adaptive_training = True
        if self.booster is before:
            return False
        self.trainings += 1
        self.last_train_size = self.data_size
        return True


def session_xgb_model() -> SessionXGBModel:
    """The cost model of an ``xgb`` session."""
    cores = max(1, os.cpu_count() or 1)
    return SessionXGBModel(extractor=PerStoreFeature(extract_workload=True), num_warmup_samples=8,
                           num_tuning_cores=cores, adaptive_training=True, tree_method="auto")
