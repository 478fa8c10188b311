"""``edgesplit certs`` refuses a validity it cannot write, before it makes the output folder."""

import pytest

from edgesplit.runtime.cli import main
from edgesplit.runtime.transport import tls


@pytest.mark.parametrize("days", [0, tls.MAX_DAYS + 1, 100_000_000])
def test_out_of_range_days_are_refused_and_no_folder_is_left(days, tmp_path):
    out = tmp_path / "certs"
    with pytest.raises(ValueError, match=f"between 1 and {tls.MAX_DAYS}"):
        tls.make_cluster_certs(out, ["a"], days=days)
    assert not out.exists()


def test_certs_cli_refuses_overflowing_days_in_one_line(tmp_path, capsys):
    out = tmp_path / "certs"
    with pytest.raises(SystemExit) as exit_:
        main(["certs", "--out", str(out), "--host", "a", "--days", "100000000"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--days: must be between 1 and" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["certs", "--out", str(out), "--host", "a", "--days", str(tls.MAX_DAYS)]) == 0  # the limit works
    assert (out / "a.pem").exists()
