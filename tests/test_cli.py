"""The command line: help, model info, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from edgesplit.runtime.cli import main


def test_info_lists_cuts(capsys):
    assert main(["info", "resnet_fm"]) == 0
    out = capsys.readouterr().out
    assert "exits at cuts [4, 7]" in out and "stage2.2" in out


def test_unknown_benchmark_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "nope"])
    assert exit_.value.code == 2 and "accuracy" in capsys.readouterr().err


def test_bench_flags_are_checked_before_the_run(tmp_path, capsys):
    from edgesplit.bench import BENCHMARKS
    from edgesplit.runtime.cli_args import BENCHMARK_NAMES

    assert BENCHMARK_NAMES == BENCHMARKS
    # a folder or a .png as --json: found after a whole run (the results lost), or the plot
    # overwrote the JSON
    (tmp_path / "afile").write_text("")
    for target in (str(tmp_path), str(tmp_path / "results.png"), str(tmp_path / "afile" / "r.json")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "accuracy", "--json", target])
        assert exit_.value.code == 2, target
        capsys.readouterr()
    for flags in (["--window-s", "0"], ["--window-s", "nan"]):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "controller", *flags])
        assert exit_.value.code == 2
        capsys.readouterr()
    assert main(["bench", "accuracy", "--device", "pi4"]) == 2  # a TypeError traceback before
    assert "--device does not apply to this benchmark" in capsys.readouterr().err
    assert main(["bench", "accuracy", "--model", "resnet_fm"]) == 2
    assert "--model does not apply to this benchmark" in capsys.readouterr().err
    for flags in (["--model", "vgg16"], ["--window", "middle"]):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "controller", *flags])
        assert exit_.value.code == 2
        capsys.readouterr()


def test_console_scripts_start():
    bin_dir = Path(sys.executable).parent
    for cmd in (["edgesplit", "--help"], ["edge-node", "--help"]):
        out = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "edgesplit.runtime.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert "--threshold" in out.stdout


def test_demo_refuses_bad_flags_with_a_message_not_a_traceback(capsys, tmp_path):
    from edgesplit.runtime.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\nnot a sample\n")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"0 1\n\xb7\xff\xfe\n")
    long_line = tmp_path / "long.txt"
    long_line.write_text("1" * 100_000)
    for argv, needle in ((["--samples", "0"], "samples must be within"), (["--rate", "-1"], "--rate >= 0"),
                         (["--cut", "99"], "cut must be"), (["--trace", str(bad)], "bad.txt:2"),
                         (["--trace", str(tmp_path)], "Is a directory"),  # a traceback before
                         (["--trace", str(binary)], "bin.dat: not a text trace"),  # the file was not named
                         (["--trace", str(long_line)], "long.txt:1: a line longer than 4096")):  # echoed whole
        assert main(["demo", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err) < 500, err[:300]
    # --json is checked before a 45 s run, not after it
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--json", str(tmp_path / "no" / "such" / "x.json")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_sigterm_stops_the_demo_and_its_node_as_ctrl_c_does(tmp_path):
    """SIGTERM's default ended the demo and left its edge-node and workers serving, owned by init."""
    import signal

    import psutil

    from tests.helpers import wait_until

    demo = subprocess.Popen([sys.executable, "-m", "edgesplit.runtime.cli", "demo", "--cut", "4", "--samples", "700",
                             "--rate", "5", "--no-compare", "--no-kill", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def node_serving():
            for child in psutil.Process(demo.pid).children(recursive=True):
                try:
                    cmd = " ".join(child.cmdline())
                except psutil.NoSuchProcess:
                    continue
                if "edgesplit.runtime.node" in cmd and any(
                        c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
                    return child
            return None

        node = wait_until(node_serving, timeout=120, what="the demo's edge-node listening")
        family = [node, *node.children(recursive=True)]  # the node and its worker processes
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


@pytest.mark.parametrize(("argv", "needle"), [
    (["info", "nosuch"], "unknown model 'nosuch'"),
    (["train", "nosuch"], "unknown model 'nosuch'"),
    (["controller", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["profile", "resnet_fm", "--out", "p.json", "--batches", "a"], "--batches: 'a'"),
    (["profile", "resnet_fm", "--out", "p.json", "--batches", "1,0"], "--batches: '1,0'"),
    (["profile", "resnet_fm", "--out", "p.json", "--repeats", "0"], "--repeats: must be at least 1"),
    (["profile", "resnet_fm", "--out", "p.json", "--threads", "0"], "--threads: must be at least 1"),
    (["profile", "resnet_fm", "--out", "p.json", "--cpu-quota", "-1"], "--cpu-quota: must be greater than 0"),
    (["profile", "resnet_fm", "--out", "."], "is a folder"),
    (["profile", "resnet_fm", "--out", "no/such/folder/p.json"], "does not exist"),
    (["plan", "--bandwidth", "0"], "--bandwidth: must be greater than 0"),
    (["plan", "--bandwidth", "-5"], "--bandwidth: must be greater than 0"),
    (["plan", "--bandwidth", "nan"], "--bandwidth: must be a finite number"),
    (["plan", "--rtt", "-100"], "--rtt: must be at least 0"),
    (["plan", "--json", "."], "--json: . is a folder"),
    (["plan", "--out", "afile"], "afile exists and is not a folder"),
    (["train", "--epochs", "0"], "--epochs: must be at least 1"),
    (["train", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["train", "--threads", "-1"], "--threads: must be at least 0"),
    (["train", "--limit", "0"], "--limit: must be at least 1"),
    (["train", "--limit", "-5"], "--limit: must be at least 1"),
    (["train", "--out", "afile"], "afile exists and is not a folder"),
    (["nonn", "train", "--threads", "-1"], "--threads: must be at least 0"),
    (["nonn", "train", "--members", "0"], "--members: must be at least 1"),
    (["nonn", "train", "--widths", "0", "0", "0"], "--widths: must be at least 1"),
    (["certs", "--out", "c", "--host", "a", "--days", "100000000"], "--days: must be between 1 and 36500"),
    # --heartbeat nan made the controller never repeat its decisions: devices fell back and
    # re-followed every 1.5 s
    (["controller", "--heartbeat", "nan"], "--heartbeat: must be a finite number"),
    (["controller", "--heartbeat", "0"], "--heartbeat: must be greater than 0"),
    (["controller", "--slo-ms", "-5"], "--slo-ms: must be greater than 0"),
    (["controller", "--accuracy-target", "7"], "--accuracy-target: must be from 0 to 1"),
    (["controller", "--low-battery", "nan"], "--low-battery: must be a finite number"),
    (["controller", "--port-file", "."], "--port-file: . is a folder"),
    (["plan", "--plot", "p.xyz"], "--plot: p.xyz: give an image file name ending in one of"),  # a traceback, late
    (["profile", "resnet_fm", "--out", "p.json", "--batches", "1,200000"], "batch sizes go up to 256"),
    (["controller", "--metrics-port", "70000"], "--metrics-port: must be a port from 0 to 65535"),
])
def test_user_mistakes_exit_2_with_one_line_before_any_work(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written, no folder made


def test_controller_reports_an_endpoint_zeromq_refuses(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        assert main(["controller", "--telemetry", taken, "--decisions", "tcp://127.0.0.1:*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgesplit controller:") and taken in err and err.count("\n") == 1
    assert main(["controller", "--telemetry", "garbage"]) == 2
    assert "garbage" in capsys.readouterr().err


def test_nonn_train_refuses_too_many_members_before_the_teacher_pass(capsys, tmp_path, monkeypatch):
    from edgesplit.partitioner.nonn import train as nonn_train

    def no_teacher_pass(*args, **kwargs):
        raise AssertionError("the teacher pass ran before the members were checked")

    monkeypatch.setattr(nonn_train, "prepare", no_teacher_pass)
    assert main(["nonn", "train", "--members", "1000", "--out", str(tmp_path)]) == 2
    assert "members must be between 1 and 64" in capsys.readouterr().err


def test_train_refuses_a_data_folder_without_the_dataset(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["train", "--epochs", "1", "--limit", "8", "--data", str(tmp_path / "nowhere"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'} does not exist" in err and "Traceback" not in err
    assert not out.exists()


def test_a_reader_that_leaves_early_gets_no_traceback(monkeypatch):
    """`edgesplit info resnet18 | head -3` printed a BrokenPipeError traceback."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", "resnet18"]) == 141  # 128 + SIGPIPE, as a shell reports it; no exception


def test_plan_refuses_a_profile_whose_codec_costs_are_not_numbers(tmp_path, capsys):
    """A NaN encode cost won the plan with "nan ms"; a negative one gave negative totals."""
    import json

    from edgesplit.partitioner.explain import plan_rows

    good = tmp_path / "good.json"
    assert main(["profile", "resnet_fm", "--out", str(good), "--repeats", "1"]) == 0
    plan_rows("resnet_fm", 5.0, device_profile=str(good))  # the untouched profile plans
    for name, value in (("nan", float("nan")), ("neg", -1.0), ("str", "x"), ("list", [1])):
        data = json.loads(good.read_text())
        data["encode_seconds_per_element"] = value
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(data))
        assert main(["plan", "resnet_fm", "--device-profile", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "encode_seconds_per_element must be a finite number >= 0" in err and "Traceback" not in err
