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


def test_unknown_benchmark_names_the_choices():
    with pytest.raises(SystemExit, match="accuracy"):
        main(["bench", "nope"])


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
