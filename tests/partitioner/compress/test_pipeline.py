"""``edgesplit compress CONFIG`` end to end on a tiny budget: every step, its bundles, its
plots, resumption, and clear errors for bad configurations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgesplit.partitioner.bundle import BundleError, load_bundle
from edgesplit.partitioner.compress.config import load_config
from edgesplit.runtime.cli import main
from edgesplit.runtime.control.exits import settings_from_manifest

TINY = """
[compress]
base = "resnet_fm"
out = "out"
validation = 200
train_limit = 800
test_limit = 200

[prune]
removed = 0.9
steps = 1
finetune_epochs = 1
sweep_rates = [0.0, 0.5, 0.9]

[prune.distill]
epochs = 1
hints = [4]

[int8]
calibration_images = 100

[bottleneck]
candidates = [[7, 4, 2]]
epochs = 1
finetune_epochs = 1

[exits]
cuts = [2, 4]
epochs = 1

[rate]
test_images = 40
"""


def test_compress_runs_every_step_and_resumes(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    assert main(["compress", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "prune:" in printed and "bottleneck: cut 7" in printed
    prune = json.loads((out / "prune.json").read_text())
    assert prune["removed_fraction"] >= 0.9 and prune["hints"] == [4]
    bundle = load_bundle(out / "resnet_fm_pruned")  # rebuilt from the manifest's layer shapes
    assert bundle.model.name == "resnet_fm_pruned"
    assert sum(p.numel() for p in bundle.model.parameters()) == prune["params_after"]
    assert load_bundle(out / "resnet_fm_int8").manifest["int8"]["engine"] == "x86"
    assert load_bundle(out / "resnet_fm_bottleneck").manifest["bottleneck"]["bytes"] == 4 * 7 * 7 + 8
    manifest = load_bundle(out / "resnet_fm_exits").manifest
    exits = manifest["exits"]
    assert set(exits["tables"]) == {"2", "4"}
    settings = settings_from_manifest(manifest)  # what the controller chooses among
    assert settings[0].name == "no exits" and not settings[0].thresholds
    assert all(set(s.thresholds) <= {2, 4} and 0 <= s.accuracy <= 1 for s in settings)
    rate = json.loads((out / "rate.json").read_text())
    assert {p["codec"] for p in rate["curve"]} == {"fp32", "fp16", "int8", "int8-channel"}
    assert (out / "rate_accuracy.png").stat().st_size > 0 and (out / "size_accuracy.png").stat().st_size > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    weights = (out / "resnet_fm_pruned" / "weights.safetensors").read_bytes()
    assert not list((out / "checkpoints").glob("*.safetensors"))  # finished steps drop their checkpoints
    assert main(["compress", str(config)]) == 0  # finished steps are skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps
    assert (out / "resnet_fm_pruned" / "weights.safetensors").read_bytes() == weights
    captured = capsys.readouterr()
    assert captured.out.count("already done") == 5 and "WARNING" not in captured.err
    # a finished step whose settings changed since is not silently passed off as the new one
    config.write_text(TINY.replace("[exits]\n", "[exits]\nhead = \"light\"\n"))
    assert main(["compress", str(config), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "exits: WARNING" in err and "(head)" in err and "prune: WARNING" not in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps


def test_a_second_cycle_continues_from_a_pruned_bundle_with_an_ensemble_teacher(tmp_path, capsys):
    import torch

    from edgesplit.models import load_trained
    from edgesplit.models.weights_io import save_weights
    from edgesplit.partitioner.compress.architecture import layer_shapes

    head = TINY.split("[int8]")[0]
    off = "[int8]\nenabled = false\n[bottleneck]\nenabled = false\n[exits]\nenabled = false\n[rate]\nenabled = false\n"
    first = tmp_path / "first.toml"
    first.write_text(head.replace('out = "out"', 'out = "first"') + off)
    assert main(["compress", str(first), "--quiet"]) == 0
    earlier = json.loads((tmp_path / "first" / "prune.json").read_text())
    start = load_bundle(tmp_path / "first" / "resnet_fm_pruned")

    other = load_trained("resnet_fm")
    with torch.no_grad():
        other.blocks[-1][-1].bias.add_(0.5)
    (tmp_path / "nets").mkdir()
    sha = save_weights(other, tmp_path / "nets" / "other.safetensors")
    (tmp_path / "nets" / "other.json").write_text(json.dumps({"sha256": sha}))  # its card
    second = tmp_path / "second.toml"
    second.write_text(head.replace('out = "out"', 'out = "second"').replace(
        "[prune.distill]", 'start_from = "first/resnet_fm_pruned"\nextra_teachers = ["nets/other.safetensors"]\n'
        "[prune.distill]") + off)
    assert main(["compress", str(second), "--quiet"]) == 0
    result = json.loads((tmp_path / "second" / "prune.json").read_text())
    bundle = load_bundle(tmp_path / "second" / "resnet_fm_pruned")
    assert layer_shapes(bundle.model) == layer_shapes(start.model)  # the same student, not pruned anew
    assert result["params_after"] == earlier["params_after"] and result["steps"] == []
    record = result["started_from"]
    assert record["bundle"] == "resnet_fm_pruned" and record["test_accuracy"] == earlier["acc_after"]
    assert record["weights_sha256"] == start.manifest["files"]["weights.safetensors"]
    assert [t["weights"] for t in result["extra_teachers"]] == ["nets/other.safetensors"]
    assert result["importance"] == earlier["importance"] == "magnitude"
    assert result["train_seconds"] > earlier["train_seconds"]  # both cycles' epochs counted
    moved = [not torch.equal(a, b) for a, b in zip(bundle.model.parameters(), start.model.parameters())]
    assert any(moved)  # trained further

    # a bundle that was not pruned is refused with a reason
    from edgesplit.partitioner.bundle import write_bundle

    write_bundle(load_trained("resnet_fm"), tmp_path / "plain")
    third = tmp_path / "third.toml"
    third.write_text(second.read_text().replace("first/resnet_fm_pruned", "plain").replace('"second"', '"third"'))
    capsys.readouterr()
    assert main(["compress", str(third), "--quiet"]) == 2
    assert "not a pruned bundle" in capsys.readouterr().err


def test_pruning_to_hand_set_widths_goes_there_in_steps_and_the_bundle_rebuilds_them(tmp_path):
    from torch import nn

    head = TINY.split("[int8]")[0].replace("steps = 1", "steps = 2")
    off = "[int8]\nenabled = false\n[bottleneck]\nenabled = false\n[exits]\nenabled = false\n[rate]\nenabled = false\n"
    widths = '[prune.widths]\n"blocks.0.0" = 6\n"blocks.4.conv2" = 10\n"blocks.7.conv2" = 16\n"blocks.8.conv1" = 4\n'
    config = tmp_path / "widths.toml"
    config.write_text(head.replace("[prune.distill]", widths + "[prune.distill]") + off)
    assert main(["compress", str(config), "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert result["widths"] == {"blocks.0.0": 6, "blocks.4.conv2": 10, "blocks.7.conv2": 16, "blocks.8.conv1": 4}
    assert result["sweep"] == [] and len(result["steps"]) == 2 and result["global_pruning"] is None
    first, second = result["steps"]
    assert 0 < first["removed"] < second["removed"] == result["removed_fraction"]  # halfway, then there
    bundle = load_bundle(tmp_path / "out" / "resnet_fm_pruned")
    convs = {n: m.out_channels for n, m in bundle.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert [convs[k] for k in result["widths"]] == [6, 10, 16, 4]
    assert bundle.manifest["compression"]["pruning"]["widths"] == result["widths"]


@pytest.mark.parametrize("text, message", [
    ("[prune]\nremove = 0.9\n", "unknown key prune.remove"),
    ("[prune]\nremoved = \"lots\"\n", "prune.removed"),
    ("[prune]\nglobal_pruning = false\nisomorphic = true\n", "prune.isomorphic"),
    ("[prune]\nremoved = 1.5\n", "between 0 and 1"),
    ("[prune]\nimportance = \"random\"\n", "prune.importance"),
    ("[int8]\nengine = \"tpu\"\n", "int8.engine"),
    ("[bottleneck]\ncandidates = [[7, 4]]\n", "[cut, channels"),
    ("[exits]\nepochs = \"four\"\n", "exits.epochs"),
    ("[exits]\nepochs = 0\n", "at least 1"),
    ("[prune]\nremoved = \"knee\"\nsweep_rates = [0.0, 0.5]\n", "three"),
    ("[prune\n", "not valid TOML"),
    ("[prune]\nstart_from = \"nothing\"\n", "prune.start_from"),
    ("[prune]\nextra_teachers = [\"missing.safetensors\"]\n", "prune.extra_teachers"),
    ("[prune.widths]\n\"blocks.1.conv1\" = 0\n", "at least 1 channel"),
    ("[prune.widths]\n\"blocks.1.conv1\" = \"wide\"\n", "prune.widths.blocks.1.conv1"),
    ("[prune.widths]\n\"blocks.1.bn1\" = 4\n", "not a convolution"),
    ("[prune.widths]\nblocks.1.conv1 = 4\n", "quote a dotted key"),
    # these once failed deep inside the run with a traceback, or ran and did something else
    ("[compress]\nbase = \"resnet_nope\"\n", "compress.base"),
    ("[prune.distill]\nhints = [99]\n", "prune.distill.hints: cut 99"),
    ("[prune.distill]\nhints = [0]\n", "prune.distill.hints: cut 0"),
    ("[prune.distill]\nhints = \"47\"\n", "\"cluster\" or a list of cuts"),  # was read as cuts [4, 7]
    ("[bottleneck]\ncandidates = [[99, 4, 2]]\n", "bottleneck.candidates: cut 99"),
    ("[prune.distill]\nbatch_size = 0\n", "prune.distill.batch_size must be at least 1"),
    ("[prune.distill]\ntemperature = 0.0\n", "prune.distill.temperature must be > 0"),  # trained on NaN
    ("[int8]\ncalibration_images = 0\n", "int8.calibration_images"),  # calibrated on nothing
    ("[compress]\ntrain_limit = -1\n", "compress.train_limit"),  # sliced from the end: 59,799 images
    ("[rate]\ntest_images = -5\n", "rate.test_images"),
])
def test_bad_configurations_are_refused_with_the_key(tmp_path, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["compress", str(config), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_an_unusable_output_folder_or_a_truncated_result_is_reported_not_a_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    config = tmp_path / "c.toml"
    config.write_text("[compress]\nout = \"afile\"\n")
    assert main(["compress", str(config), "--quiet"]) == 2
    assert "compress.out" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "prune.json").write_text('{"params_before": 1')  # cut off while written
    config.write_text("[compress]\nout = \"out\"\ntrain_limit = 200\ntest_limit = 100\nvalidation = 50\n")
    assert main(["compress", str(config), "--quiet", "--steps", "prune"]) == 2
    err = capsys.readouterr().err
    assert "prune.json is not valid JSON" in err and "Delete it" in err
    assert main(["compress", str(config), "--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_folder_is_refused_until_the_first_is_gone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "prune.json").write_text('{"params_before": 1')  # reached only past the lock
    config = tmp_path / "c.toml"
    config.write_text("[compress]\nout = \"out\"\ntrain_limit = 200\ntest_limit = 100\nvalidation = 50\n")
    holder = subprocess.Popen(  # a run in another process, holding the folder's lock like a real one
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
         "from edgesplit.partitioner.compress.pipeline import _lock_out\n"
         "lock = _lock_out(Path(sys.argv[1]))\nprint('locked', flush=True)\nsys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["compress", str(config), "--quiet", "--steps", "prune"]) == 2
        err = capsys.readouterr().err
        assert f"another 'edgesplit compress' run (pid {holder.pid}) is writing to" in err
    finally:
        holder.kill()  # killed, not closed: the kernel must release its lock
        holder.wait(timeout=30)
    assert main(["compress", str(config), "--quiet", "--steps", "prune"]) == 2
    assert "prune.json is not valid JSON" in capsys.readouterr().err


def test_a_missing_configuration_is_reported(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "none.toml")]) == 2
    assert "no configuration" in capsys.readouterr().err


def test_the_shipped_configuration_is_valid():
    from edgesplit.partitioner.compress import WEIGHTS_DIR

    cfg = load_config(WEIGHTS_DIR.parent / "configs" / "resnet_fm.toml")
    assert cfg.out_dir.resolve() == WEIGHTS_DIR.resolve()
    assert cfg.prune.widths and cfg.bottleneck.candidates
    # the committed pruned bundle is what the configuration's widths make
    pruned = load_bundle(WEIGHTS_DIR / "resnet_fm_pruned")
    assert pruned.manifest["compression"]["pruning"]["widths"] == cfg.prune.widths
    convs = dict(pruned.model.named_modules())
    assert all(convs[name].out_channels == width for name, width in cfg.prune.widths.items())
    assert json.loads((WEIGHTS_DIR / "prune.json").read_text())["config"]["widths"] == cfg.prune.widths
    # the exits' backbone never saw the validation split; the committed bundle was made on it
    backbone = json.loads(Path(cfg.exits.backbone).with_suffix(".json").read_text())
    assert backbone["dataset"]["train_images"] == 60000 - cfg.compress.validation
    exits = load_bundle(WEIGHTS_DIR / "resnet_fm_exits").manifest["exits"]
    assert exits["backbone"]["sha256"] == backbone["sha256"] and exits["max_drop_points"] == cfg.exits.max_drop_points


def test_exits_go_on_the_configured_backbone_and_drops_stay_against_the_shipped_model(tmp_path, capsys):
    import torch

    from edgesplit.models import load_trained
    from edgesplit.models.weights_io import save_weights

    other = load_trained("resnet_fm")
    with torch.no_grad():
        other.blocks[-1][-1].bias.add_(0.5)  # another backbone: the classifier's bias moved
    (tmp_path / "nets").mkdir()
    sha = save_weights(other, tmp_path / "nets" / "held_out.safetensors")
    (tmp_path / "nets" / "held_out.json").write_text(json.dumps(
        {"sha256": sha, "dataset": {"train_images": 55000}, "exits": [{"test_accuracy": 0.9}]}))
    config = tmp_path / "exits.toml"
    config.write_text('[compress]\nbase = "resnet_fm"\nout = "out"\nvalidation = 200\ntrain_limit = 800\n'
                      'test_limit = 200\n[prune]\nenabled = false\n[int8]\nenabled = false\n'
                      '[bottleneck]\nenabled = false\n[rate]\nenabled = false\n'
                      '[exits]\ncuts = [4]\nepochs = 1\nbackbone = "nets/held_out.safetensors"\n')
    assert main(["compress", str(config), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "exits.json").read_text())
    assert summary["backbone"] == {"weights": "held_out.safetensors", "sha256": sha, "train_images": 55000,
                                   "test_accuracy": 0.9}
    bundle = load_bundle(tmp_path / "out" / "resnet_fm_exits")
    assert torch.equal(bundle.model.blocks[-1][-1].bias, other.blocks[-1][-1].bias)
    assert bundle.manifest["exits"]["backbone"]["weights"] == "held_out.safetensors"
    shipped = load_trained("resnet_fm")
    assert not torch.equal(bundle.model.blocks[-1][-1].bias, shipped.blocks[-1][-1].bias)
    from edgesplit.partitioner.compress.data import accuracy, load_splits

    test = load_splits(200, train_limit=800, test_limit=200)
    assert summary["acc_before"] == pytest.approx(accuracy(shipped, test.test_x, test.test_y))

    # light heads: recorded in the manifest, rebuilt on load, answers unchanged; a manifest
    # naming an unknown kind is refused before anything is built from it
    light = tmp_path / "light.toml"
    light.write_text(config.read_text().replace('out = "out"', 'out = "light"').replace(
        "epochs = 1\n", 'epochs = 1\nhead = "light"\n'))
    assert main(["compress", str(light), "--quiet"]) == 0
    assert json.loads((tmp_path / "light" / "exits.json").read_text())["exit_head"] == "light"
    bundle = load_bundle(tmp_path / "light" / "resnet_fm_exits")
    assert bundle.manifest["exit_head"] == "light" and bundle.model.exit_cuts == [4]
    assert any(m.groups > 1 for m in bundle.model.exits["4"].modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(3, 1, 28, 28)
    again = load_bundle(tmp_path / "light" / "resnet_fm_exits").model
    assert all(torch.equal(a, b) for a, b in zip(bundle.model.forward_exits(x), again.forward_exits(x)))
    manifest_path = tmp_path / "light" / "resnet_fm_exits" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for bad in ("huge", ["light"]):
        manifest_path.write_text(json.dumps({**manifest, "exit_head": bad}))
        with pytest.raises(BundleError, match="exit"):
            load_bundle(tmp_path / "light" / "resnet_fm_exits")

    missing = tmp_path / "missing.toml"
    missing.write_text(config.read_text().replace("held_out", "nowhere").replace('out = "out"', 'out = "out2"'))
    assert main(["compress", str(missing), "--quiet"]) != 0
    assert "nowhere" in capsys.readouterr().err
