"""The demo: a real node process behind the link emulator, killed and restarted mid-run,
every request answered once; the embedded controller moves the plan as a trace swings the
bandwidth, and the same trace is replayed under the fixed plans it is compared with."""

from edgesplit.runtime.demo import DEMO_TRACE, render_summary, run_demo


def test_demo_answers_every_request_through_a_node_failure(tmp_path):
    fast = tmp_path / "fast.txt"
    fast.write_text("0 50\n")
    s = run_demo(samples=150, rate_hz=25, progress=False, cut=4, threshold=0.9, trace=fast, compare=False)
    assert s["sent"] == s["answered"] == 150 and s["lost"] == 0 and s["duplicated"] == 0
    assert s["where"].get("edge", 0) > 0 and s["where"].get("device-fallback", 0) > 0
    assert any("first offloaded answer" in e for e in s["events"]), s["events"]
    assert s["accuracy"] >= 0.85
    assert sum(s["exits"].values()) == 150 and "exit@4" in s["exits"]
    text = render_summary(s)
    for needle in ("answered 150", "lost 0", "accuracy", "transfer", "edge", "exits:", "cut 4"):
        assert needle in text


def test_the_controller_follows_a_swinging_link_and_the_fixed_plans_replay_it(tmp_path):
    swing = tmp_path / "swing.txt"
    swing.write_text("0 8\n1.5 0.05\n3 8\n4.5 0.05\n")  # loops every 6 s
    s = run_demo(samples=150, rate_hz=25, progress=False, kill=False, trace=swing)
    assert s["sent"] == s["answered"] == 150 and s["lost"] == 0 and s["duplicated"] == 0
    cuts = [d["cut"] for d in s["decisions"]]
    assert 0 in cuts and 11 in cuts, s["decisions"]  # it offloaded the image and went back to the device
    assert all(d["bandwidth_mbit"] > 0 for d in s["decisions"])
    assert sum(p["requests"] for p in s["plans"].values()) == 150
    assert set(s["plans"]) >= {str(d["epoch"]) for d in s["decisions"]}  # a plan no request ran under too
    assert any(p["where"].get("edge") for p in s["plans"].values())
    assert any(p["where"].get("device") for p in s["plans"].values())
    assert set(s["compare"]) == {"adaptive", "all on the device", "all on the edge"}
    assert s["compare"]["all on the device"]["where"] == {"device": 150}
    text = render_summary(s)
    for needle in ("plan 1:", "where requests ran under each plan", "all on the edge", "Mbit/s"):
        assert needle in text


def test_the_shipped_trace_loads():
    from edgesplit.linksim.traces import load_trace

    samples = load_trace(DEMO_TRACE)
    assert len(samples) > 30 and max(r for _, r in samples) > 1.5 and min(r for _, r in samples) < 0.4
