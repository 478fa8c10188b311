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
    for argv, needle in ((["--samples", "0"], "samples must be within"), (["--rate", "-1"], "--rate >= 0"),
                         (["--cut", "99"], "cut must be"), (["--trace", str(bad)], "bad.txt:2")):
        assert main(["demo", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


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
