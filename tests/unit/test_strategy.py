"""The strategy wrapper: exact budget, and every schedule measured at most once per log (resume included).

Real MetaSchedule objects (tune context, design spaces, database, ReplayTrace); no board is needed
because nothing here is measured.
"""

from __future__ import annotations

import pytest

from tests.conftest import HOST_TARGET, matmul_workload


@pytest.fixture(scope="module")
def workload():
    return matmul_workload()


def _strategy(workload, database, budget, *, fixed: bool = False, seed: int = 1, per_iter: int = 4):
    """A BudgetedStrategy over ReplayTrace, initialised as MetaSchedule's task scheduler does."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import BudgetedStrategy

    strategy = BudgetedStrategy("random", budget)
    # fixed=True: a space without decisions, so every sample is the same schedule.
    space = (ms.space_generator.ScheduleFn(lambda sch: None, sch_rules=[], postprocs=[], mutator_probs={})
             if fixed else "post-order-apply")
    ctx = ms.TuneContext(mod=workload, target=tvm.target.Target(HOST_TARGET), space_generator=space,
                         search_strategy=strategy, task_name="matmul", rand_state=seed,
                         num_threads=1)  # one sampling thread: the same seed samples the same schedules
    strategy.pre_tuning(64, per_iter, ctx.space_generator.generate_design_space(workload), database, None)
    return strategy


def _commit(database, workload, candidates) -> None:
    """What MetaSchedule's AddToDatabase callback writes for measured candidates."""
    import tvm
    from tvm.s_tir.meta_schedule.database import TuningRecord

    token = database.commit_workload(workload)
    for candidate in candidates:
        database.commit_tuning_record(TuningRecord(candidate.sch.trace, token, [1e-3],
                                                   tvm.target.Target(HOST_TARGET), candidate.args_info))


def _keys(candidates) -> set[int]:
    from host.tuning.strategy import schedule_key

    return {schedule_key(c.sch.mod) for c in candidates}


def test_a_batch_never_holds_the_same_schedule_twice(workload):
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import Budget

    budget = Budget(remaining=10)
    strategy = _strategy(workload, ms.database.MemoryDatabase(), budget, fixed=True)
    batch = strategy.generate_measure_candidates()
    assert len(batch) == 1  # four samples of a one-schedule space are one trial
    assert strategy.duplicates_dropped == budget.repeats_skipped == 3
    assert budget.remaining == 9  # only what is measured is taken from the budget


def test_a_space_fully_measured_in_the_log_ends_the_task_without_spending_budget(workload):
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import Budget

    database = ms.database.MemoryDatabase()
    first = _strategy(workload, database, Budget(remaining=10), fixed=True)
    _commit(database, workload, first.generate_measure_candidates())

    budget = Budget(remaining=10)
    resumed = _strategy(workload, database, budget, fixed=True)
    assert resumed.generate_measure_candidates() is None
    assert budget.remaining == 10


def test_a_resumed_search_skips_what_the_log_already_measured(workload):
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import Budget

    database = ms.database.MemoryDatabase()
    first = _strategy(workload, database, Budget(remaining=64), seed=7).generate_measure_candidates()
    assert len(_keys(first)) == len(first) == 4
    # The same search and seed proposes the same schedules again: a resume would measure them twice.
    again = _strategy(workload, ms.database.MemoryDatabase(), Budget(remaining=64), seed=7)
    assert _keys(again.generate_measure_candidates()) == _keys(first)

    _commit(database, workload, first)
    resumed = _strategy(workload, database, Budget(remaining=64), seed=7)
    batch = resumed.generate_measure_candidates()
    assert batch and not _keys(batch) & _keys(first)
    assert resumed.duplicates_dropped >= 4


def test_records_of_another_workload_do_not_count(workload):
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import Budget

    a = te.placeholder((64,), "float32", name="A")
    other = tvm.IRModule({"main": te.create_prim_func([a, te.compute((64,), lambda i: a[i] + 1.0, name="B")])
                          .with_attr("global_symbol", "main")})
    database = ms.database.MemoryDatabase()
    _commit(database, other, _strategy(other, database, Budget(remaining=10), fixed=True).generate_measure_candidates())
    assert len(_strategy(workload, database, Budget(remaining=10), fixed=True).generate_measure_candidates()) == 1


def test_the_first_batch_of_a_task_is_trimmed_to_the_short_first_pass(workload):
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import Budget

    budget = Budget(remaining=64, first_batch=2)
    strategy = _strategy(workload, ms.database.MemoryDatabase(), budget, per_iter=8)
    assert len(strategy.generate_measure_candidates()) == 2
    strategy.notify_runner_results([], [])
    assert len(strategy.generate_measure_candidates()) == 8  # later batches are full
    assert budget.remaining == 64 - 10


def test_a_resume_from_the_log_file_skips_schedules_whose_weights_were_repacked(workload, tmp_path):
    """A kernel whose weight may be repacked (layout rewrite) is post-processed by ``RewriteLayout``;
    the log's records, read back from its JSON files, must still be recognised as measured."""
    from tvm.s_tir import meta_schedule as ms

    from host.tuning.strategy import Budget

    repacked = type(workload)({"main": workload["main"].with_attr("layout_free_buffers", [1])})
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    first = _strategy(repacked, database, Budget(remaining=64), seed=7).generate_measure_candidates()
    assert any("transform_layout" in str(c.sch.trace) for c in first)  # the weight was repacked
    _commit(database, repacked, first)

    reopened = ms.database.JSONDatabase(work_dir=str(tmp_path))
    resumed = _strategy(repacked, reopened, Budget(remaining=64), seed=7)
    batch = resumed.generate_measure_candidates()
    assert batch and not _keys(batch) & _keys(first)
    assert resumed.duplicates_dropped >= len(first)
