"""The session's cost model retrains by the session's own growth, however many seed records it holds.

Real MetaSchedule objects (tune context, design space, sampled schedules, feature extraction, XGBoost
training); the timings are given, since nothing here is measured.
"""

from __future__ import annotations

import pytest

from tests.conftest import HOST_TARGET, matmul_workload


@pytest.fixture(scope="module")
def samples():
    """A tune context of a 64x64 matmul and 48 distinct sampled schedules of it, each with a timing."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    from host.tuning.strategy import Budget, BudgetedStrategy

    workload = matmul_workload()
    strategy = BudgetedStrategy("random", Budget(remaining=48))
    context = ms.TuneContext(mod=workload, target=tvm.target.Target(HOST_TARGET), space_generator="post-order-apply",
                             search_strategy=strategy, task_name="matmul", rand_state=1, num_threads=1)
    strategy.pre_tuning(64, 48, context.space_generator.generate_design_space(workload), None, None)
    candidates = strategy.generate_measure_candidates()
    assert len(candidates) >= 24
    # A made-up but consistent timing: what matters here is when the model trains, not what it learns.
    results = [RunnerResult([1e-4 * (1 + i % 7)], None) for i in range(len(candidates))]
    return context, candidates, results


def _trainings_of_stock(context, batches) -> list[bool]:
    """Which updates retrained MetaSchedule's own XGBModel (adaptive training), batch by batch."""
    from tvm.s_tir.meta_schedule.cost_model import XGBModel
    from tvm.s_tir.meta_schedule.feature_extractor import PerStoreFeature

    model = XGBModel(extractor=PerStoreFeature(extract_workload=True), num_warmup_samples=8, adaptive_training=True)
    trained = []
    for cands, results in batches:
        before = model.booster
        model.update(context, cands, results)
        trained.append(model.booster is not before)
    return trained


def _batches(candidates, results, start: int, sizes: list[int]):
    out, at = [], start
    for size in sizes:
        out.append((candidates[at:at + size], results[at:at + size]))
        at += size
    return out


def test_a_cold_model_trains_when_metaschedule_would(samples):
    from host.tuning.cost_model import session_xgb_model

    context, candidates, results = samples
    batches = _batches(candidates, results, 0, [4, 4, 4, 4, 4, 2])
    model = session_xgb_model()
    trained = []
    for cands, res in batches:
        before = model.trainings
        model.update(context, cands, res)
        trained.append(model.trainings > before)
    assert trained == _trainings_of_stock(context, batches)
    assert trained[:3] == [True, True, True] and not trained[-1]  # 2 more after 20 is under a fifth


def test_a_pretrained_model_trains_once_then_on_the_sessions_first_records(samples):
    from host.tuning.cost_model import session_xgb_model

    context, candidates, results = samples
    seed = _batches(candidates, results, 0, [8, 8, 8])
    session = _batches(candidates, results, 24, [4, 4])
    model = session_xgb_model()
    assert model.pretrain([(context, cands, res) for cands, res in seed]) == 24
    assert model.trainings == 1 and model.booster is not None and model.pretrained == model.data_size == 24
    model.update(context, *session[0])
    assert model.trainings == 2  # the session's first 4 records: a model of the seed alone no longer
    model.update(context, *session[1])
    assert model.trainings == 3
    assert model.data_size == 32
    # MetaSchedule's model, given the same 24 seed records, would not retrain on the session's first 4.
    assert _trainings_of_stock(context, seed + session)[3] is False
