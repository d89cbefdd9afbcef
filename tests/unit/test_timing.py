"""How a new log times candidates: cold when the model's weights leave the board's caches."""

from __future__ import annotations


def test_large_kernels_are_timed_cold_when_the_weights_leave_the_caches():
    from host.tuning.timing import weights_leave_the_caches

    mib = 1024 * 1024
    zen3 = {"llc_kib": 32 * 1024}
    assert not weights_leave_the_caches(14 * mib, zen3)  # mobilenet_v2 in a 32 MiB L3
    assert weights_leave_the_caches(45 * mib, zen3)  # resnet18 does not fit
    assert weights_leave_the_caches(14 * mib, {"llc_kib": 1024})  # a Pi 4's 1 MiB L2
    assert weights_leave_the_caches(200_000, None) and weights_leave_the_caches(200_000, {"llc_kib": 0})
