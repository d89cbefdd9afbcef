"""Which task gets the next batch: a short first pass, then trials where the model's time is."""

from __future__ import annotations

import pytest

from host.tuning.scheduler import MAX_BATCHES_WITHOUT_RESULT, MIN_TIME_SHARE, batch_sizes, next_task


def test_every_task_gets_a_batch_before_any_gets_a_second():
    batches = [0, 0, 0]
    order = []
    for _ in range(3):
        chosen = next_task([None, None, None], [1, 1, 1], batches, [0, 1, 2])
        order.append(chosen)
        batches[chosen] += 1
    assert order == [0, 1, 2]


def test_tasks_a_seed_measured_skip_the_first_pass():
    from host.tuning.scheduler import WeightedScheduler

    # Tasks 0 and 2 had a seed's schedule measured (a replay): only task 1 needs a first batch, then
    # trials go by the model's time, to task 2 (8 ms) before task 0 (1 ms).
    best = [1000.0, None, 8000.0]
    scheduler = WeightedScheduler(lambda: best, [1, 1, 1], measured=[0, 2])
    assert scheduler.batches == [1, 0, 1]
    batches = list(scheduler.batches)
    assert next_task(best, [1, 1, 1], batches, [0, 1, 2]) == 1
    batches[1] += 1
    best[1] = 500.0
    assert next_task(best, [1, 1, 1], batches, [0, 1, 2]) == 2
    assert WeightedScheduler(lambda: best, [1, 1, 1]).batches == [0, 0, 0]


def test_after_the_first_pass_trials_follow_the_share_of_model_time():
    # task 0 carries 9 ms x 1, task 1 carries 1 ms x 1: about nine batches to one.
    best = [9000.0, 1000.0]
    batches = [1, 1]
    for _ in range(18):
        batches[next_task(best, [1, 1], batches, [0, 1])] += 1
    assert batches[0] == pytest.approx(9 * batches[1], abs=9)
    assert batches[1] >= 2


def test_weight_counts_as_much_as_latency():
    # the same kernel latency, but the model runs task 1 six times
    chosen = next_task([100.0, 100.0], [1, 6], [1, 1], [0, 1])
    assert chosen == 1


def test_a_tiny_share_of_the_model_gets_no_more_trials_while_a_larger_one_is_left():
    best = [10_000.0, 10_000.0 * MIN_TIME_SHARE / 2]
    batches = [50, 1]  # even after many batches of task 0, task 1 stays capped
    assert next_task(best, [1, 1], batches, [0, 1]) == 0
    # once the large task is finished (terminated), the small one may take what is left
    assert next_task(best, [1, 1], batches, [1]) == 1


def test_a_task_without_a_result_is_retried_a_few_times_then_left():
    best = [5000.0, None]
    assert next_task(best, [1, 1], [1, 1], [0, 1]) == 1
    assert next_task(best, [1, 1], [1, MAX_BATCHES_WITHOUT_RESULT], [0, 1]) == 0
    assert next_task([None], [1], [MAX_BATCHES_WITHOUT_RESULT], [0]) is None
    assert next_task(best, [1, 1], [1, 1], []) is None


@pytest.mark.parametrize("remaining,tasks,first,later", [
    (64, 7, 4, 9),      # tiny_cnn at 64 trials: half the budget in the first pass at most
    (16, 7, 2, 2),
    (500, 32, 7, 15),   # mobilenet_v2
    (2000, 32, 8, 16),
    (3, 7, 2, 2),
])
def test_batch_sizes(remaining, tasks, first, later):
    assert batch_sizes(remaining, tasks) == (first, later)
    if remaining >= 4 * tasks:
        assert first * tasks <= remaining // 2


def test_a_kernel_far_below_the_models_best_flop_rate_gets_more_trials():
    from host.tuning.scheduler import ROOM_WEIGHT, room

    # Equal shares of the model's time (1 ms each), but task 1 does a third of task 0's work in it: it
    # runs at a third of the rate task 0 shows the board can reach.
    best, flops = [1000.0, 1000.0], [3e9, 1e9]
    assert room(best, flops, [0, 1]) == pytest.approx({0: 1.0, 1: 1.0 + ROOM_WEIGHT * 2 / 3})
    batches = [1, 1]
    for _ in range(30):
        batches[next_task(best, [1, 1], batches, [0, 1], flops)] += 1
    assert batches[1] == pytest.approx(batches[0] * (1.0 + ROOM_WEIGHT * 2 / 3), abs=1.5)
    # Without FLOP counts (or a task without one), trials follow the model's time alone.
    batches = [1, 1]
    for _ in range(30):
        batches[next_task(best, [1, 1], batches, [0, 1])] += 1
    assert abs(batches[0] - batches[1]) <= 1
    assert room(best, [3e9, 0.0], [0, 1]) == {0: 1.0, 1: 1.0}


def test_room_never_outweighs_a_much_larger_share_of_the_models_time():
    # Task 1 is at a tenth of the best rate but carries a fifth of task 0's time: task 0 still leads.
    best, flops = [5000.0, 1000.0], [50e9, 1e9]
    assert next_task(best, [1, 1], [1, 1], [0, 1], flops) == 0


def test_overlap_seconds_counts_work_during_any_measurement_once():
    from host.tuning.scheduler import overlap_seconds

    measurements = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]  # two boards at first: one union 0-3, then 5-6
    assert overlap_seconds([(2.5, 5.5)], measurements) == 1.0  # 2.5-3 and 5-5.5
    assert overlap_seconds([(0.5, 1.5), (3.0, 5.0)], measurements) == 1.0  # 0.5-1.5 once, not twice
    assert overlap_seconds([(6.0, 7.0)], measurements) == 0.0
    assert overlap_seconds([], measurements) == 0.0 and overlap_seconds([(0.0, 1.0)], []) == 0.0


def test_builds_overlap_timings_only_when_every_board_is_another_machine():
    """The hosts are the addresses the tracker lists a key's boards under: a build on this machine may
    only run beside a timing when none of them is this machine."""
    import ipaddress
    import os

    from device_agent.mdns import local_ipv4_addresses
    from host.tuning.runner import boards_elsewhere

    mine = local_ipv4_addresses()
    lan = [a for a in mine if not ipaddress.ip_address(a).is_loopback]
    assert lan, f"this machine has no LAN address: {mine}"
    others = [a for a in ("198.51.100.7", "203.0.113.9", "192.0.2.77") if a not in mine][:2]
    assert len(others) == 2
    assert boards_elsewhere(others) is True
    assert boards_elsewhere([]) is False  # no board: nothing to overlap with
    for here in ("127.0.0.1", "::1", "localhost", os.uname().nodename, lan[0]):
        assert boards_elsewhere([here]) is False, here
        assert boards_elsewhere([others[0], here]) is False, here  # one board here: its timings would be skewed


def test_a_cost_model_pretrained_on_more_than_the_first_pass_shortens_it():
    # resnet18 (19 tasks) at 175 trials: a first pass of 4 each would measure 76 records.
    assert batch_sizes(175, 19) == (4, 9)
    assert batch_sizes(175, 19, pretrained=499) == (2, 9)  # a store's mobilenet_v2 session
    assert batch_sizes(175, 19, pretrained=75) == (4, 9)  # fewer than the pass would give the model
    assert batch_sizes(16, 7, pretrained=499) == (2, 2)
