"""The demo: a real node process killed and restarted mid-run; every request answered once."""

from edgesplit.runtime.demo import render_summary, run_demo


def test_demo_answers_every_request_through_a_node_failure():
    s = run_demo(samples=300, rate_hz=25, progress=False)
    assert s["sent"] == s["answered"] == 300 and s["lost"] == 0 and s["duplicated"] == 0
    assert s["where"].get("edge", 0) > 0 and s["where"].get("device-fallback", 0) > 0
    assert any("first offloaded answer" in e for e in s["events"]), s["events"]
    assert s["accuracy"] >= 0.85
    assert sum(s["exits"].values()) == 300 and "exit@4" in s["exits"]
    text = render_summary(s)
    for needle in ("answered 300", "lost 0", "accuracy", "transfer", "edge", "exits:"):
        assert needle in text
