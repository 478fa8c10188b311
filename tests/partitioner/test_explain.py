"""``edgesplit plan``: the table covers every cut, the choice is the least predicted total,
the reason names the plan kind, and an edge profile from another graph is refused."""

import json

import pytest

from edgesplit.partitioner.explain import plan_rows, render
from edgesplit.runtime.cli import main


@pytest.fixture(scope="module")
def slow_link_plan():
    return plan_rows("resnet_fm", bandwidth_mbit=0.5, device="pi4", repeats=2)


def test_the_choice_is_the_least_predicted_total_and_says_why(slow_link_plan):
    plan = slow_link_plan
    best = min(plan["cuts"], key=lambda r: r["total_ms"])
    assert plan["choice"]["cut"] == best["cut"] == plan["cuts"][-1]["cut"]  # 0.5 Mbit/s: stay on the device
    assert "everything on the device" in plan["choice"]["reason"]
    assert plan["cuts"][0]["bytes"] == 784  # the input as uint8 pixels
    assert "predicted" in plan["device_profile"] and "<- chosen" in render(plan)


def test_cli_writes_json_and_plot_and_refuses_a_foreign_edge_profile(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["plan", "resnet_fm", "--bandwidth", "50", "--device", "mcu", "--json", str(out),
                 "--plot", str(png)]) == 0
    plan = json.loads(out.read_text())
    assert plan["device"] == "mcu" and png.stat().st_size > 1000
    foreign = tmp_path / "edge.json"
    foreign.write_text(json.dumps({"model": "x", "host": "h", "torch": "t", "threads": 1, "cpus": 1,
                                   "node_names": ["a"], "seconds": {"1": [0.1]}, "repeats": 1, "cpu_quota": None,
                                   "schema": 1}))
    assert main(["plan", "resnet_fm", "--edge-profile", str(foreign)]) == 2
    assert "profile the same model" in capsys.readouterr().err
