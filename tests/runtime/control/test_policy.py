"""Policies over the cost model: the cut follows the bandwidth, exits and accuracy targets
trade off, a low battery moves to a lower-energy plan with a predicted saving, and
hysteresis stops a noisy estimate from flapping the plan."""

import math

import pytest

from edgesplit.runtime.control.battery import SimulatedBattery
from edgesplit.runtime.control.policy import (
    BatteryAware,
    ExitSetting,
    Hysteresis,
    LeastEnergy,
    LeastLatency,
    MostAccurate,
    Option,
    PlanSpace,
    State,
)

SHAPES = [(3, 64, 64), (32, 16, 16), (64, 8, 8), (128, 4, 4), (10,)]


def space(**kwargs):
    return PlanSpace.uniform(blocks=4, device_block_s=0.02, edge_block_s=0.002, shapes=SHAPES, **kwargs)


def test_the_cut_moves_to_the_edge_as_bandwidth_grows():
    s, policy = space(), LeastLatency()
    cuts = [policy.choose(s.options(st), st).cut for st in (State(m, 0.01) for m in (0.05, 1.0, 5.0, 200.0))]
    assert cuts[0] == 4 and cuts[-1] == 0
    assert cuts == sorted(cuts, reverse=True)


def test_accuracy_target_and_slo_trade_exits_against_latency():
    exits = [ExitSetting({}, {}, 0.93, "off"), ExitSetting({1: 0.8}, {1: 0.6}, 0.90, "exit@1 0.8")]
    s, st = space(exit_settings=exits, exit_seconds={1: 0.001}), State(0.5, 0.02)
    fastest = LeastLatency().choose(s.options(st), st)
    assert fastest.exits.name == "exit@1 0.8"  # 60 % leave after one block
    assert LeastLatency(accuracy_target=0.92).choose(s.options(st), st).exits.name == "off"
    accurate = MostAccurate(slo_s=10.0).choose(s.options(st), st)
    assert accurate.accuracy == 0.93
    assert MostAccurate(slo_s=1e-6).choose(s.options(st), st) == fastest  # nothing meets it: the fastest
    # A target nothing meets: the most accurate options, not the fastest of all (the least
    # accurate, here exits taken at 0.5)
    low = [*exits, ExitSetting({1: 0.5}, {1: 0.9}, 0.50, "exit@1 0.5")]
    s = space(exit_settings=low, exit_seconds={1: 0.001})
    assert LeastLatency(accuracy_target=0.99).choose(s.options(st), st).accuracy == 0.93
    assert LeastEnergy(slo_s=10.0, accuracy_target=0.99).choose(s.options(st), st).accuracy == 0.93


def test_a_low_battery_moves_to_a_lower_energy_plan_with_a_predicted_saving():
    s = space()
    policy = BatteryAware(mains=LeastLatency(), saving=LeastEnergy(slo_s=0.2), low_level=0.3)
    battery = SimulatedBattery(capacity_j=10.0, level=0.5)
    full = battery.reading(at=0.0)
    st = State(0.8, 0.01, full.level, full.on_battery)  # the device is faster than sending the image
    before = policy.choose(s.options(st), st)
    for i in range(100):  # requests drain it below the threshold
        battery.drain(0.05, at=float(i))
    low = battery.reading(at=100.0)
    assert low.level < 0.3 and low.on_battery
    st_low = State(0.8, 0.01, low.level, low.on_battery)
    after = policy.choose(s.options(st_low), st_low)
    assert after.key != before.key
    assert after.energy_j < before.energy_j  # the predicted saving per request
    assert after.latency_s <= 0.2  # within the SLO
    saving = 1 - after.energy_j / before.energy_j
    assert saving > 0.1, saving


def test_hysteresis_keeps_the_plan_while_the_estimate_wobbles():
    s, inner = space(), LeastLatency()

    def cut_at(mbit):
        st = State(mbit, 0.01)
        return inner.choose(s.options(st), st).cut

    low, high = 0.05, 200.0  # device at one end, edge at the other: find where it switches
    for _ in range(40):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if cut_at(mid) == cut_at(0.05) else (low, mid)
    wobbling = [State(m, 0.01) for m in (low * 0.97, high * 1.03) * 3]
    bare = {inner.choose(s.options(st), st).cut for st in wobbling}
    steady = Hysteresis(inner, margin=0.1, hold=2)
    held = {steady.choose(s.options(st), st).cut for st in wobbling}
    assert len(bare) == 2, "the wobble must straddle a switch point for this test to mean anything"
    assert len(held) == 1
    # a real change, seen twice, goes through
    for st in (State(200.0, 0.01), State(200.0, 0.01)):
        choice = steady.choose(s.options(st), st)
    assert choice.cut == 0


class Scripted:
    """An inner policy that wants the option the test names (the state is that name)."""

    def choose(self, options, state):
        return next(o for o in options if o.cut == state)


def options_at(device_ms: float, offload_ms: float) -> list[Option]:
    off = ExitSetting({}, {}, 0.9, "off")
    return [Option(4, "int8", off, device_ms / 1000, 1.0, 0.9), Option(2, "int8", off, offload_ms / 1000, 1.0, 0.9)]


def run_hysteresis(policy: Hysteresis, steps: list[tuple[float, float, int]]) -> list[int]:
    """The cut chosen at each (device ms, offload ms, wanted cut) step."""
    return [policy.choose(options_at(dev, off), want).cut for dev, off, want in steps]


def test_hysteresis_lets_a_small_steady_advantage_through_once_it_adds_up():
    steady = Hysteresis(Scripted(), margin=0.1, hold=2)
    assert run_hysteresis(steady, [(100, 100, 4)]) == [4]
    # 5 % better each time: not by the margin, but four in a row add up to margin * hold
    assert run_hysteresis(steady, [(100, 95, 2)] * 4) == [4, 4, 4, 2]
    # 10 % better: twice in a row, as before
    back = Hysteresis(Scripted(), margin=0.1, hold=2)
    assert run_hysteresis(back, [(100, 100, 4), (100, 89, 2), (100, 89, 2)]) == [4, 4, 2]


def test_one_advantage_as_large_as_the_whole_sum_switches_at_once_unless_the_sum_is_off():
    assert run_hysteresis(Hysteresis(Scripted(), margin=0.1, hold=2), [(100, 100, 4), (100, 75, 2)]) == [4, 2]
    off = Hysteresis(Scripted(), margin=0.1, hold=2, accrue=0)  # only the margin twice in a row
    assert run_hysteresis(off, [(100, 100, 4)] + [(100, 95, 2)] * 6 + [(100, 75, 2)] * 2) == [4] * 8 + [2]
    # the sum is for one option: wanting another starts it afresh
    other = Hysteresis(Scripted(), margin=0.1, hold=2, least=0.01)
    options = [*options_at(100, 95), Option(1, "int8", ExitSetting({}, {}, 0.9, "off"), 0.095, 1.0, 0.9)]
    assert [other.choose(options, want).cut for want in (4, 2, 1, 2, 1, 2, 1)] == [4] * 7
    # a prediction that is not a number breaks the run of decisions: 5 % three times, then
    # once more after it, is not four in a row
    nan = [(100, 100, 4)] + [(100, 95, 2)] * 3 + [(100, math.nan, 2), (100, 95, 2)]
    assert run_hysteresis(Hysteresis(Scripted(), margin=0.1, hold=2), nan) == [4] * 6


def test_hysteresis_does_not_add_up_a_wobble_or_an_advantage_within_the_noise():
    wobble = Hysteresis(Scripted(), margin=0.1, hold=2)
    # 6 % one way, then the current plan wanted again: the sum starts afresh each time
    steps = [(100, 100, 4)] + [(100, 94, 2), (100, 94, 2), (100, 100, 4)] * 5
    assert set(run_hysteresis(wobble, steps)) == {4}
    tiny = Hysteresis(Scripted(), margin=0.1, hold=2)  # 2 % is below margin / 4: never adds up
    assert set(run_hysteresis(tiny, [(100, 100, 4)] + [(100, 98, 2)] * 50)) == {4}
    with pytest.raises(ValueError):
        Hysteresis(Scripted(), margin=1.5)


def test_battery_schedule_and_bounds():
    battery = SimulatedBattery(capacity_j=100.0, level=0.1, schedule=[(5.0, True), (8.0, False)], charge_w=10.0)
    assert battery.reading(0.0).on_battery
    assert not battery.reading(6.0).on_battery
    assert battery.reading(7.0).level == pytest.approx(0.3)  # plugged in from 5 s to 7 s at 10 W
    assert battery.reading(9.0).on_battery
    with pytest.raises(ValueError):
        SimulatedBattery(capacity_j=0)
    # Refused when made, not at the first reading inside a request (an IndexError there made
    # every runner.infer fail), nor read as nonsense (a level of -9, NaN, "no" as plugged in)
    for bad in ({"capacity_j": float("nan")}, {"capacity_j": float("inf")}, {"capacity_j": 1.0, "charge_w": -10},
                {"capacity_j": 1.0, "schedule": [(5,)]}, {"capacity_j": 1.0, "schedule": [("5", True)]},
                {"capacity_j": 1.0, "schedule": [(5, "no")]}, {"capacity_j": 1.0, "schedule": [(float("nan"), True)]}):
        with pytest.raises(ValueError):
            SimulatedBattery(**bad)


def test_a_head_that_holds_none_of_an_exit_settings_exits_is_offered_once_as_no_exits():
    exits = [ExitSetting({}, {}, 0.93, "off"), ExitSetting({2: 0.8}, {2: 0.5}, 0.90, "exit@2 0.8")]
    s, st = space(exit_settings=exits, exit_seconds={2: 0.001}), State(0.5, 0.02)
    offered = {(o.cut, o.exits.name) for o in s.options(st) if o.codec == "int8" or o.cut == 4}
    assert (0, "exit@2 0.8") not in offered and (1, "exit@2 0.8") not in offered
    assert {(0, "off"), (1, "off"), (2, "exit@2 0.8"), (4, "exit@2 0.8")} <= offered


def test_the_edge_queue_is_paid_only_by_the_inputs_that_reach_the_edge():
    exits = [ExitSetting({}, {}, 0.93, "off"), ExitSetting({2: 0.8}, {2: 0.9}, 0.92, "exit@2 0.8")]
    s = space(exit_settings=exits, exit_seconds={2: 0.0}, codecs=("int8",))
    idle, busy = State(5.0, 0.01), State(5.0, 0.01, edge_wait_s=1.0)
    cost = {(o.cut, o.exits.name): o.latency_s for o in s.options(idle)}
    for o in s.options(busy):
        extra = o.latency_s - cost[(o.cut, o.exits.name)]
        expected = 0.0 if o.cut == 4 else 0.1 if o.exits.name == "exit@2 0.8" else 1.0
        assert extra == pytest.approx(expected), (o.cut, o.exits.name)


def test_a_space_with_nothing_to_choose_is_refused_up_front():
    with pytest.raises(ValueError, match="one-byte codec"):
        space(codecs=("fp32",), allowed_cuts=[0])
    for cuts in ([99], [], [-1, 2]):  # no options at all: min() of nothing inside a request
        with pytest.raises(ValueError, match="allowed cuts must be some of 0..4"):
            space(allowed_cuts=cuts)


def test_a_learned_device_scale_moves_the_prediction_and_the_choice():
    s, policy = space(), LeastLatency()
    profiled = State(0.05, 0.01)
    assert policy.choose(s.options(profiled), profiled).cut == 4  # a slow link: all on the device
    slow_device = State(0.05, 0.01, device_scale=30.0)
    options = {o.cut: o for o in s.options(slow_device)}
    base = {o.cut: o for o in s.options(profiled)}
    assert options[4].latency_s == pytest.approx(30 * base[4].latency_s)  # all device time
    assert options[0].latency_s == pytest.approx(base[0].latency_s)  # nothing runs on the device
    assert options[4].energy_j > base[4].energy_j
    assert policy.choose(s.options(slow_device), slow_device).cut < 4
    # a scale learned at one cut applies there only; the others take the overall one
    mixed = State(0.05, 0.01, device_scale=1.0, device_scales={2: 3.0})
    got = {o.cut: o.latency_s for o in s.options(mixed)}
    assert got[4] == pytest.approx(base[4].latency_s)
    assert got[2] - base[2].latency_s == pytest.approx(2 * 2 * 0.02)  # two device blocks, 3x instead of 1x


def test_device_seconds_of_a_path_count_the_head_its_encoding_and_the_exits_it_ran():
    s = space(exit_seconds={1: 0.001, 3: 0.002})
    assert s.device_seconds(4) == pytest.approx(0.08)
    assert s.device_seconds(4, exits_run=(1, 3)) == pytest.approx(0.083)
    assert s.device_seconds(2, exits_run=(1, 3)) == pytest.approx(0.041)  # exit 3 lies beyond the cut
    assert s.device_seconds(4, exit_cut=1, exits_run=(1, 3)) == pytest.approx(0.021)


def test_an_offloads_predicted_time_is_the_same_whatever_share_of_inputs_leaves_at_an_exit():
    exits = [ExitSetting({}, {}, 0.93, "off"), ExitSetting({1: 0.8}, {1: 0.6}, 0.90, "exit@1 0.8")]
    s, st = space(exit_settings=exits, exit_seconds={1: 0.001}), State(0.5, 0.02, edge_wait_s=0.003)
    by_key = {o.key: o for o in s.options(st)}
    for cut in (1, 2, 3):  # cuts past the exit: 40 % of the inputs offload, each taking as long as without exits
        plain, exiting = by_key[(cut, "fp32", "off")], by_key[(cut, "fp32", "exit@1 0.8")]
        assert exiting.remote_s == pytest.approx(plain.remote_s)
        assert exiting.latency_s < plain.latency_s  # the mean over all inputs is what the exits lower
    sent = 4 * 32 * 16 * 16  # cut 1's fp32 tensor
    assert by_key[(1, "fp32", "off")].remote_s > sent * 8 / 0.5e6 + 0.003  # its bytes at 0.5 Mbit/s, and the queue
    assert by_key[(4, "fp32", "off")].remote_s == 0.0  # all on the device offloads nothing


def test_options_are_predicted_only_for_the_allowed_cuts_and_equal_those_of_a_full_space():
    full, some = space(), space(allowed_cuts=[1, 3])
    st = State(2.0, 0.01)
    allowed = [o for o in full.options(st) if o.cut in (1, 3)]
    assert {o.cut for o in some.options(st)} == {1, 3}
    key = lambda o: (o.cut, o.codec)  # noqa: E731
    assert sorted(some.options(st), key=key) == sorted(allowed, key=key)
