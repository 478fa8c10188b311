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
