"""Link estimator: harmonic mean shrugs off a fast outlier, a sharp drop is followed within
three requests or at once after a silence, the RTT is the overhead of small requests."""

import pytest

from edgesplit.runtime.control.estimators import LinkEstimator


def feed(est, mbit, n, start=0.0, step=0.05, nbytes=125_000, rtt=0.02):
    for i in range(n):
        est.observe(nbytes, nbytes * 8 / (mbit * 1e6) + rtt, 0.0, at=start + i * step)


def probe(est, mbit, at, overhead=0.004, lead=8_000, second=32_000):
    """A probe at ``mbit``: the lead's round trip, the second's gap behind it, its own round trip."""
    lead_s = overhead + 8 * lead / (mbit * 1e6)
    gap_s = 8 * second / (mbit * 1e6)
    return est.observe_train(lead, lead_s, second, gap_s, lead_s + gap_s, at=at)


def test_one_fast_outlier_barely_moves_the_estimate():
    est = LinkEstimator(window=16, initial_mbit=5.0, initial_rtt_s=0.02)
    feed(est, 5.0, 15)
    est.observe(125_000, 0.021, 0.0, at=1.0)  # one request that went through a buffer almost at once
    assert est.bandwidth_mbit == pytest.approx(5.0, rel=0.07)


def test_a_sharp_drop_is_followed_within_three_requests():
    est = LinkEstimator(window=16, initial_mbit=20.0)
    feed(est, 20.0, 16)
    assert est.bandwidth_mbit == pytest.approx(20.0, rel=0.02)
    feed(est, 1.0, 2, start=1.0, step=0.1)
    assert est.drops == 0 and est.bandwidth_mbit > 5  # two slow requests are not yet a drop
    feed(est, 1.0, 1, start=1.2)
    assert est.drops == 1 and est.bandwidth_mbit == pytest.approx(1.0, rel=0.05)


def test_after_a_silence_one_slow_request_is_enough():
    est = LinkEstimator(window=16, initial_mbit=20.0, drop_after_s=0.5)
    feed(est, 20.0, 16)
    est.observe(125_000, 1.02, 0.0, at=10.0)  # the first request after 9 s of silence
    assert est.drops == 1 and est.bandwidth_mbit == pytest.approx(1.0, rel=0.05)


def test_rtt_comes_from_the_overhead_and_edge_time_is_not_transfer():
    est = LinkEstimator(window=8, initial_mbit=10.0, initial_rtt_s=0.05)
    for i in range(8):
        est.observe(1000, 0.0308 + 0.010, edge_seconds=0.010, at=i * 0.1)
    assert est.rtt_s == pytest.approx(0.03, abs=0.002)
    with pytest.raises(ValueError):
        LinkEstimator(window=2, drop_samples=3)


def test_a_probe_train_measures_bandwidth_free_of_the_fixed_costs():
    est = LinkEstimator(initial_mbit=100.0, initial_rtt_s=0.0)
    # 8 kB, then 32 kB right behind it, at 2 Mbit/s behind 30 ms of fixed cost (RTT, serving, the answer)
    probe(est, 2.0, at=0.0, overhead=0.030)
    assert est.bandwidth_mbit == pytest.approx(2.0) and est.rtt_s == pytest.approx(0.030)
    before = est.estimate
    # arrivals too close to tell apart: only "at least 40 kB in 50 ms" (6.4 Mbit/s), not 32 kB in 50 us
    est.observe_train(8_000, 0.05, 32_000, 0.00005, 0.05, at=1.0)
    assert before.bandwidth_mbit < est.bandwidth_mbit < 6.5 and est.samples == before.samples + 1
    est.observe_train(8_000, 0.06, 32_000, -0.001, 0.059, at=2.0)  # the second stamped first: still bounded
    assert est.bandwidth_mbit < 6.5


def test_a_link_that_comes_back_is_seen_after_two_sparse_probes_not_a_window():
    est = LinkEstimator(window=16, initial_mbit=0.3)
    feed(est, 0.3, 16, nbytes=10_000)
    assert est.bandwidth_mbit == pytest.approx(0.3, rel=0.05)
    # probes a second apart at 2 Mbit/s
    assert not est.unconfirmed
    probe(est, 2.0, at=10.0)
    assert est.rises == 0 and est.bandwidth_mbit < 0.5  # one fast probe may be an outlier
    assert est.unconfirmed  # ... which the controller's prober confirms without backing off
    probe(est, 2.0, at=11.0)
    assert est.rises == 1 and est.bandwidth_mbit == pytest.approx(2.0, rel=0.05) and not est.unconfirmed
    # dense requests need three in a row; a normal one in between resets the count
    est2 = LinkEstimator(window=16, initial_mbit=1.0)
    feed(est2, 1.0, 16)
    feed(est2, 4.0, 2, start=1.0)
    feed(est2, 1.0, 1, start=1.1)
    feed(est2, 4.0, 2, start=1.15)
    assert est2.rises == 0 and est2.bandwidth_mbit < 1.5
    feed(est2, 4.0, 3, start=1.3)
    assert est2.rises == 1 and est2.bandwidth_mbit == pytest.approx(4.0, rel=0.1)


def test_the_rtt_is_never_below_the_least_overhead_seen():
    # Probes at 2 Mbit/s behind 1, 30 and 30 ms of fixed cost: an extrapolating 10th
    # percentile of those overheads is -16 ms.
    est = LinkEstimator(window=16, initial_mbit=2.0, initial_rtt_s=0.0)
    for i, overhead in enumerate((0.001, 0.03, 0.03)):
        probe(est, 2.0, at=i, overhead=overhead)
        assert 0.001 - 1e-9 <= est.rtt_s <= 0.03, est.rtt_s


def test_an_offload_that_missed_its_deadline_bounds_the_rate_and_can_start_a_drop():
    est = LinkEstimator(window=16, initial_mbit=10.0, initial_rtt_s=0.01, drop_after_s=0.5)
    feed(est, 10.0, 16, rtt=0.01)
    est.observe_timeout(125_000, 0.11, at=1.0)  # 1 Mbit in 0.1 s: no lower than 10 Mbit/s, says nothing
    assert est.drops == 0 and est.bandwidth_mbit == pytest.approx(10.0, rel=0.05)
    est.observe_timeout(125_000, 2.01, at=5.0)  # after a silence: at most 0.5 Mbit/s
    assert est.drops == 1 and est.bandwidth_mbit == pytest.approx(0.5, rel=0.05)


def test_a_first_sample_far_above_the_guess_is_not_taken_alone():
    est = LinkEstimator(initial_mbit=1.0, initial_rtt_s=0.0)
    est.observe_train(8_000, 0.001, 32_000, 0.0018, 0.0028, at=1.0)  # 142 Mbit/s: through a buffer
    assert est.bandwidth_mbit == 1.0 and est.rises == 0
    est2 = LinkEstimator(initial_mbit=1.0, initial_rtt_s=0.0)
    probe(est2, 0.2, at=1.0, overhead=0.001)
    assert est2.bandwidth_mbit == pytest.approx(0.2) and est2.drops == 1  # far below: taken at once


def test_device_time_is_learned_per_cut_with_the_overall_ratio_at_least_1_for_cuts_not_seen():
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    est = DeviceTimeEstimator(window=4, min_samples=2)
    assert est.scale(3) == 1.0 and est.scales() == {}
    est.observe(cut=8, observed_s=0.3, predicted_s=0.2)
    assert est.scales() == {} and est.scale(8) == pytest.approx(1.5)  # one answer: the overall ratio (slower: carried)
    for observed in (0.4, 0.4, 0.4, 5.0):  # one stalled request among them
        est.observe(cut=8, observed_s=observed, predicted_s=0.2)
    assert est.scale(8) == pytest.approx(2.0)  # the median of the last 4, not pulled by the stall
    est.observe(cut=20, observed_s=0.5, predicted_s=0.5)
    assert est.scale(20) == pytest.approx(2.0)  # seen once: still the overall median
    assert est.scale(3) == est.overall()
    est.observe(cut=20, observed_s=100.0, predicted_s=0.5)
    assert max(est._by_cut[20]) == 8.0  # clamped
    est.observe(cut=20, observed_s=0.0, predicted_s=0.5)  # nothing to learn from a zero
    assert est.samples == 7
    with pytest.raises(ValueError):
        DeviceTimeEstimator(low=2.0)


def test_a_cut_not_run_for_a_while_takes_the_overall_ratio_again_and_tiny_predictions_teach_nothing():
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    est = DeviceTimeEstimator(window=4, min_samples=2, stale_after=6, min_predicted_s=0.001)
    for _ in range(3):  # a burst of contention while the plan ran everything on the device
        est.observe(cut=20, observed_s=4.0, predicted_s=0.5)
    assert est.scale(20) == pytest.approx(8.0)
    for _ in range(5):  # the plan moved away; the device is back to speed
        est.observe(cut=8, observed_s=0.2, predicted_s=0.2)
    assert est.scale(20) == pytest.approx(8.0)  # 5 answers since cut 20 last ran: still its own
    est.observe(cut=8, observed_s=0.2, predicted_s=0.2)
    assert est.scale(20) == pytest.approx(1.0) == est.overall()  # 6: stale, the overall ratio
    est.observe(cut=1, observed_s=0.0005, predicted_s=0.00005)  # mostly fixed per-request cost
    assert est.samples == 9 and est.overall() == pytest.approx(1.0)
    # run again (a trial of two answers): its own ratio now, not the contention's brought back
    est.observe(cut=20, observed_s=0.5, predicted_s=0.5)
    est.observe(cut=20, observed_s=0.5, predicted_s=0.5)
    assert est.scale(20) == pytest.approx(1.0) and len(est._by_cut[20]) == 2


def test_rates_older_than_max_age_leave_the_window():
    # A moderate rise (1.6x: not a "sharp" one) seen only by sparse probes while everything
    # runs on the device: a window of old rates would hold the estimate near 1 Mbit/s for
    # a whole window of probes.
    est = LinkEstimator(window=16, initial_mbit=1.0, max_age_s=10.0)
    feed(est, 1.0, 16)
    probe(est, 1.6, at=5.0)
    assert est.bandwidth_mbit < 1.1  # within max_age: one rate among sixteen
    probe(est, 1.6, at=14.0)
    assert est.bandwidth_mbit == pytest.approx(1.6, rel=0.02)  # the rates of t < 4 s are gone
    # A rate far above an estimate whose window aged out still waits for a second one.
    probe(est, 20.0, at=40.0)
    assert est.bandwidth_mbit == pytest.approx(1.6, rel=0.02) and est.unconfirmed
    with pytest.raises(ValueError, match="max_age_s"):
        LinkEstimator(max_age_s=0)


def test_the_float_harmonic_mean_and_first_decile_agree_with_the_statistics_module():
    import random
    import statistics

    from edgesplit.runtime.control.estimators import first_decile, harmonic_mean

    rng = random.Random(1)
    for n in range(2, 40):
        values = [rng.uniform(0.01, 1e7) for _ in range(n)]
        assert harmonic_mean(values) == pytest.approx(statistics.harmonic_mean(values), rel=1e-12)
        assert first_decile(values) == pytest.approx(statistics.quantiles(values, n=10, method="inclusive")[0],
                                                     rel=1e-12)
    assert harmonic_mean([3.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([3.0, -1.0])


def test_a_slowdown_is_carried_to_cuts_not_seen_but_a_speed_up_is_not():
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    est = DeviceTimeEstimator(window=4, min_samples=2)
    for _ in range(3):  # a short head that fits one scheduler period: 0.4 of its profile
        est.observe(cut=5, observed_s=0.093, predicted_s=0.233)
    assert est.scale(5) == pytest.approx(0.093 / 0.233) and est.overall() == pytest.approx(0.093 / 0.233)
    assert est.scale(20) == 1.0 == est.unseen_scale()  # the whole model: its profile, not 0.4 of it
    for _ in range(4):  # other work on the CPU: everything 1.5x slower
        est.observe(cut=5, observed_s=1.5 * 0.233, predicted_s=0.233)
    assert est.scale(20) == pytest.approx(1.5) == est.unseen_scale()


def test_a_short_heads_slowdown_is_carried_to_a_longer_run_as_the_time_it_added():
    """Under a quota a 38 ms head waiting out part of a period ran 1.65x its profile; the
    whole model (112 ms) pays that wait about once, not 1.65x over."""
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    est = DeviceTimeEstimator(window=8, min_samples=2)
    for _ in range(4):
        est.observe(cut=5, observed_s=1.65 * 0.038, predicted_s=0.038)
    added = 0.65 * 0.038
    assert est.scale(20, predicted_s=0.112) == pytest.approx(1 + added / 0.112)
    assert est.unseen_scale(0.112) < est.unseen_scale() == pytest.approx(1.65)
    # a shorter run than the one seen: the ratio (spreading the added time would exceed it)
    assert est.unseen_scale(0.010) == pytest.approx(1.65)
    assert est.scale(5, predicted_s=0.5) == pytest.approx(1.65)  # a learned cut keeps its own ratio
    # a speed-up is not carried to a longer run (to a shorter one it is: see the next test)
    fast = DeviceTimeEstimator(window=4, min_samples=2)
    for _ in range(3):
        fast.observe(cut=5, observed_s=0.02, predicted_s=0.038)
    assert fast.unseen_scale(0.112) == 1.0 == fast.unseen_scale(0.039)


def test_state_prefers_learned_then_carried_then_overall_scale():
    from edgesplit.runtime.control.policy import State

    state = State(1.0, 0.01, device_scale=1.6, device_scales={8: 1.1}, unseen_scales={8: 1.3, 20: 1.2})
    assert (state.device_scale_at(8), state.device_scale_at(20), state.device_scale_at(3)) == (1.1, 1.2, 1.6)


def test_a_ratio_that_runs_again_confirmed_holds_longer_and_one_that_changed_holds_briefly():
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    est = DeviceTimeEstimator(window=4, min_samples=2, stale_after=3, max_stale_after=10)

    def run(cut: int, ratio: float, answers: int) -> None:
        for _ in range(answers):
            est.observe(cut=cut, observed_s=ratio * 0.1, predicted_s=0.1)

    run(8, 1.5, 2)  # a trial that ran slow
    run(20, 1.0, 2)
    assert est.scale(8) == pytest.approx(1.5) and est.stale_for(8) == 3
    run(20, 1.0, 1)
    assert 8 not in est.scales()  # 3 answers elsewhere: stale
    run(8, 1.55, 2)  # run again: the same ratio, within the tolerance
    assert est.stale_for(8) == 6 and est.scale(8) == pytest.approx(1.55)
    run(20, 1.0, 5)
    assert est.scale(8) == pytest.approx(1.55)  # holds for 6 answers now, not 3
    run(20, 1.0, 1)
    assert 8 not in est.scales()
    run(8, 1.5, 2)
    assert est.stale_for(8) == 10  # doubled again, up to max_stale_after
    run(20, 1.0, 10)
    run(8, 1.0, 1)
    assert est.stale_for(8) == 10  # one answer: not enough to compare yet
    run(8, 1.0, 1)
    assert est.stale_for(8) == 3 and est.scale(8) == pytest.approx(1.0)  # it changed: back to the base
    with pytest.raises(ValueError, match="stale_after"):
        DeviceTimeEstimator(stale_after=12, max_stale_after=6)


def test_a_speed_up_is_carried_from_longer_runs_to_shorter_ones_only():
    """Profiled during a slow spell, the whole model (167 ms) runs at 0.84 of its profile: a
    head of 81 ms is predicted at 0.84 too; a run longer than any seen is not."""
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    est = DeviceTimeEstimator(window=4, min_samples=2)
    for _ in range(3):
        est.observe(cut=20, observed_s=0.84 * 0.167, predicted_s=0.167)
    assert est.unseen_scale(0.081) == pytest.approx(0.84)
    assert est.unseen_scale(0.3) == 1.0 == est.unseen_scale()  # longer than any seen, or not known
    assert est.carried_scales({8: 0.081, 30: 0.3}) == pytest.approx({8: 0.84, 30: 1.0})
    est.observe(cut=5, observed_s=0.5 * 0.04, predicted_s=0.04)
    assert est.unseen_scale(0.081) == pytest.approx(0.84)  # the short head's 0.5 is not counted for 81 ms
    one = DeviceTimeEstimator(window=4, min_samples=2)
    one.observe(cut=20, observed_s=0.8 * 0.167, predicted_s=0.167)
    assert one.unseen_scale(0.081) == 1.0  # one long answer is not enough
