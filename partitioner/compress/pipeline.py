"""``edgesplit compress CONFIG``: run the configured compression steps and write their
bundles, results and plots.

Steps run in order — prune (with distillation), int8, bottleneck, exits — each one
starting from the shipped weights of the base model. A finished step leaves
``OUT/<step>.json``; a rerun skips it (delete the file to redo it). An interrupted step
resumes from its last checkpoint in ``OUT/checkpoints``. Every figure is measured on the
test set after the step's choices were made on the validation split.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from edgesplit.models import build_model, load_trained
from edgesplit.models.train import evaluate_exits

from .architecture import rebuild
from .checkpoint import read_progress, remove_checkpoints
from .config import CompressConfig, PruneConfig
from .data import Splits, load_splits
from .distill import distill
from .prune import adapt_bn, count_params, interpolated_widths, knee, prune_to, prune_to_widths, sweep

STEPS = ("prune", "int8", "bottleneck", "exits", "rate")


def _write_json(path: Path, payload: dict) -> None:
    """Write atomically: a step's result file is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _calibration(data: Splits, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    return data.x[:n], data.y[:n]


def run_prune(cfg: PruneConfig, base: str, data: Splits, out: Path, progress: bool = True) -> dict:
    """Iterative structured pruning with distillation from the shipped model; writes the
    pruned bundle ``OUT/<base>_pruned`` and returns the step's results.

    With ``cfg.start_from`` the student is that pruned bundle instead (no sweep, no pruning):
    one more distillation cycle on a finished student, whose earlier training time is added."""
    from edgesplit.models.weights_io import sha256_file
    from edgesplit.partitioner.bundle import write_bundle

    teacher = load_trained(base)
    extra_teachers = [load_trained(base, path) for path in cfg.extra_teachers]
    started = time.time()
    before = count_params(teacher)
    if cfg.start_from:
        student, pruning, earlier = _continued_student(cfg.start_from, base, data)
        curve, knee_index, steps = [], None, []  # the earlier run's are in its own results
        rate = earlier["removed_fraction"]
    else:
        student, pruning, curve, knee_index, rate, steps = _pruned_student(cfg, base, teacher, data, out, progress)
        earlier = {}
    teacher_hashes = [sha256_file(path) for path in cfg.extra_teachers]
    if extra_teachers:  # a checkpoint distilled from other teachers is refused
        pruning["extra_teachers"] = teacher_hashes
    final = distill(student, teacher, data, cfg.distill, out / "checkpoints" / "prune-final", progress, context=pruning,
                    desc="distil pruned", extra_teachers=extra_teachers)
    epoch_seconds = final["seconds"] + sum(s.pop("seconds") for s in steps) + (earlier.get("train_seconds") or 0.0)
    test_before = evaluate_exits(teacher, data.test_x, data.test_y)
    test_after = evaluate_exits(student, data.test_x, data.test_y)
    from edgesplit.partitioner.flops import block_macs

    results = {
        "params_before": before,
        "params_after": count_params(student),
        "removed_fraction": round(1 - count_params(student) / before, 4),
        "acc_before": test_before[-1],
        "acc_after": test_after[-1],
        "test_accuracy_per_output_before": test_before,
        "test_accuracy_per_output_after": test_after,
        "macs_before": sum(block_macs(teacher)),
        "macs_after": sum(block_macs(student)),
        # how the student was pruned: this run's settings, or the earlier run's record
        "importance": earlier.get("importance") if earlier else cfg.importance,
        # (ranking across layers: not used where the widths were set by hand)
        "global_pruning": earlier.get("global_pruning") if earlier else (None if cfg.widths else cfg.global_pruning),
        "isomorphic": earlier.get("isomorphic") if earlier else (None if cfg.widths else cfg.isomorphic),
        "widths": earlier.get("widths") if earlier else (cfg.widths or None),
        "sweep": curve,
        "knee_removed": curve[knee_index]["removed"] if knee_index is not None else None,
        "rate": rate,
        "steps": steps,
        "hints": final["hints"],
        "distill": final["recipe"],
        "history": final["history"],
        "train_seconds": round(epoch_seconds, 1),  # the epochs' time, summed over interrupted runs
        "seconds_this_run": round(time.time() - started, 1),
    }
    if extra_teachers:
        results["extra_teachers"] = [{"weights": f"{Path(path).parent.name}/{Path(path).name}", "sha256": sha}
                                     for path, sha in zip(cfg.extra_teachers, teacher_hashes)]
    if earlier:
        results["started_from"] = earlier["record"]
    write_bundle(student, out / f"{base}_pruned", base=base,
                 extra={"compression": {"pruning": {k: results[k] for k in (
                     "params_before", "params_after", "removed_fraction", "acc_before", "acc_after",
                     "importance", "global_pruning", "isomorphic", "widths", "hints", "train_seconds")}}})
    return results


def _pruned_student(cfg: PruneConfig, base: str, teacher, data: Splits, out: Path, progress: bool):
    """Sweep, pick the rate, then prune iteratively with a short distillation after each step
    (with ``cfg.widths``: no sweep; each step goes a geometric share of the way to them)."""
    calibration = _calibration(data)
    if cfg.widths:
        return _student_of_widths(cfg, base, teacher, data, out, progress, calibration)
    curve = sweep(teacher, cfg.sweep_rates, lambda m: _val_accuracy(m, data), data.x, cfg.importance,
                  cfg.global_pruning, calibration, isomorphic=cfg.isomorphic)
    knee_index = knee([p["removed"] for p in curve], [p["accuracy"] for p in curve]) if len(curve) >= 3 else None
    rate = curve[knee_index]["removed"] if cfg.removed == "knee" else float(cfg.removed)
    if progress:
        at = curve[knee_index]["removed"] if knee_index is not None else None
        tqdm.write(f"one-shot pruning curve (validation): {curve}; knee at {at}; pruning {rate:.0%}")
    before = count_params(teacher)
    # how the student was pruned: a checkpoint of a student pruned otherwise is refused
    pruning = {"importance": cfg.importance, "global_pruning": cfg.global_pruning, "isomorphic": cfg.isomorphic,
               "rate": rate, "steps": cfg.steps}

    def prune_step(student, i: int):
        goal = 1 - (1 - rate) ** ((i + 1) / cfg.steps)
        relative = 1 - (1 - goal) * before / count_params(student)
        return prune_to(student, relative, cfg.importance, cfg.global_pruning, calibration, isomorphic=cfg.isomorphic)

    student, steps = _prune_in_steps(cfg, base, teacher, data, out, progress, pruning, prune_step)
    return student, pruning, curve, knee_index, rate, steps


def _student_of_widths(cfg: PruneConfig, base: str, teacher, data: Splits, out: Path, progress: bool,
                       calibration):
    pruning = {"importance": cfg.importance, "widths": cfg.widths, "steps": cfg.steps}

    def prune_step(student, i: int):
        return prune_to_widths(student, interpolated_widths(student, cfg.widths, 1 / (cfg.steps - i)),
                               cfg.importance, calibration)

    student, steps = _prune_in_steps(cfg, base, teacher, data, out, progress, pruning, prune_step)
    rate = round(1 - count_params(student) / count_params(teacher), 4)
    return student, pruning, [], None, rate, steps


def _prune_in_steps(cfg: PruneConfig, base: str, teacher, data: Splits, out: Path, progress: bool, pruning: dict,
                    prune_step) -> tuple:
    """``cfg.steps`` rounds of ``prune_step(student, round)``, adaptive BN and a short
    distillation (resumed from a round's checkpoint where one is finished); the student and
    each round's record."""
    before = count_params(teacher)
    student = copy.deepcopy(teacher)
    student.name = f"{base}_pruned"
    finetune = replace(cfg.distill, epochs=cfg.finetune_epochs)
    steps = []
    for i in range(cfg.steps):
        checkpoint = out / "checkpoints" / f"prune-step{i + 1}"
        saved = read_progress(checkpoint)
        if saved is not None:
            student = rebuild(build_model(base), saved["layers"])
            student.name = f"{base}_pruned"
        else:
            student = prune_step(student, i)
            adapt_bn(student, data.x)
        one_shot = _val_accuracy(student, data) if saved is None else None
        result = distill(student, teacher, data, finetune, checkpoint, progress, desc=f"prune step {i + 1}",
                         context=pruning)
        steps.append({"removed": round(1 - count_params(student) / before, 4), "params": count_params(student),
                      "val_after_adaptive_bn": one_shot, "val_after_finetune": result["history"][-1]["val_accuracy"],
                      "seconds": result["seconds"]})
    return student, steps


def _continued_student(path: str, base: str, data: Splits):
    """The student of a finished pruned bundle, what fingerprints it, and its record."""
    from edgesplit.partitioner.bundle import load_bundle

    bundle = load_bundle(path)
    if bundle.manifest.get("model") != base:
        raise ValueError(f"prune.start_from: {path} was not pruned from {base}")
    earlier = dict((bundle.manifest.get("compression") or {}).get("pruning") or {})
    if "removed_fraction" not in earlier:
        raise ValueError(f"prune.start_from: {path} is not a pruned bundle (its manifest has no "
                         "compression.pruning record)")
    student = bundle.model
    student.name = f"{base}_pruned"
    sha = bundle.manifest["files"]["weights.safetensors"]
    earlier["record"] = {"bundle": Path(path).name, "weights_sha256": sha, "params": count_params(student),
                         "val_accuracy": _val_accuracy(student, data), "test_accuracy": earlier.get("acc_after"),
                         "train_seconds": earlier.get("train_seconds")}
    return student, {"start_from": sha}, earlier


def _val_accuracy(model, data: Splits) -> float:
    return evaluate_exits(model, data.val_x, data.val_y)[-1]


def run(cfg: CompressConfig, steps: list[str] | None = None, progress: bool = True,
        runners: dict | None = None) -> dict:
    """Run the enabled steps (or only ``steps``), skipping finished ones; return every step's results.

    ``runners`` adds step runners from outside the partitioner: the ``rate`` step measures
    the runtime's codecs, so ``edgesplit compress`` passes
    :func:`edgesplit.runtime.rate.run_rate`."""
    out = cfg.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder should be, or no permission
        raise ValueError(f"compress.out: cannot use {out} as the output folder: {exc.strerror or exc}") from None
    lock = _lock_out(out)
    try:
        return _run_steps(cfg, out, steps, progress, runners)
    finally:
        lock.close()  # releases the lock (the kernel releases it too if the process is killed)


LOCK_FILE = ".compress.lock"


def _lock_out(out: Path):
    """An exclusive lock on the output folder: two runs writing the same checkpoints and
    bundles would corrupt each other's work. Held until the returned file is closed."""
    path = out / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise ValueError(f"compress.out: cannot lock {out} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(f"another 'edgesplit compress' run (pid {holder}) is writing to {out}; "
                         "wait for it to finish or set another compress.out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _run_steps(cfg: CompressConfig, out: Path, steps: list[str] | None, progress: bool, runners: dict | None) -> dict:
    general = cfg.compress
    data = load_splits(general.validation, general.train_limit, general.test_limit)
    wanted = steps or [s for s in STEPS if getattr(cfg, s).enabled]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown steps {unknown}; the steps are {list(STEPS)}")
    results = {}
    for step in STEPS:
        if step not in wanted:
            continue
        done = out / f"{step}.json"
        if done.exists():
            try:
                results[step] = json.loads(done.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{done} is not valid JSON ({exc}): a step cut off while writing it? "
                                 "Delete it to redo the step") from None
            if not isinstance(results[step], dict):
                raise ValueError(f"{done} is not a step's results; delete it to redo the step")
            settings = getattr(cfg, step)
            changed = _changed_keys(results[step].get("config"), asdict(settings), asdict(type(settings)()))
            if changed:  # said even when quiet: the results no longer match the configuration
                tqdm.write(f"{step}: WARNING: {done} was made with other settings ({', '.join(changed)}); "
                           f"delete it to redo the step with the current ones", file=sys.stderr)
            elif progress:
                tqdm.write(f"{step}: already done ({done}); delete it to redo the step")
            continue
        runner = {**_RUNNERS, **(runners or {})}.get(step)
        if runner is None:
            raise ValueError(f"the {step} step needs a runner from outside the partitioner; "
                             "run it with 'edgesplit compress CONFIG'")
        torch.manual_seed(general.seed)  # each step starts alike, whichever steps ran before it
        results[step] = runner(getattr(cfg, step), general.base, data, out, progress)
        results[step]["config"] = asdict(getattr(cfg, step))
        _write_json(done, results[step])
        remove_checkpoints(out / "checkpoints", step)  # finished: a rerun of the step starts afresh
    from .plots import plot_results

    plot_results(out)
    return results


def _changed_keys(recorded, current: dict, defaults: dict) -> list[str]:
    """The settings of a step that differ between its finished results and the configuration
    (paths by file name, as they are recorded relative to wherever the run started; a setting
    newer than the results counts only if not at its default; ``enabled`` not at all, as a
    step can be named on the command line)."""
    if not isinstance(recorded, dict):
        return []

    def same(a, b) -> bool:
        if isinstance(a, str) and isinstance(b, str) and ("/" in a or "/" in b):
            return Path(a).name == Path(b).name
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    return sorted(k for k in current
                  if k != "enabled" and not same(recorded.get(k, defaults.get(k)), current[k]))


def summary(results: dict) -> str:
    """One line per finished step: what it achieved on the test set."""
    lines = []
    if "prune" in results:
        r = results["prune"]
        lines.append(f"prune: {r['params_before']:,} -> {r['params_after']:,} parameters "
                     f"({100 * r['removed_fraction']:.1f}% removed), {100 * r['acc_before']:.2f}% -> "
                     f"{100 * r['acc_after']:.2f}% ({r['train_seconds']:.0f} s)")
    if "int8" in results:
        r = results["int8"]
        lines.append(f"int8: weights {r['size_ratio']:.2f}x smaller, {100 * r['acc_before']:.2f}% -> "
                     f"{100 * r['acc_after']:.2f}%")
    if "bottleneck" in results:
        r = results["bottleneck"]
        lines.append(f"bottleneck: cut {r['cut']}, {r['bytes_sent']:.0f} bytes per request (fp32 {r['bytes_fp32']}, "
                     f"image {r['image_bytes']}), {r['acc_drop_points']:+.2f} points drop ({r['train_seconds']:.0f} s)")
    if "exits" in results:
        r = results["exits"]
        lines.append(f"exits: {r['mac_ratio']:.2f}x fewer device MACs per sample, {r['acc_drop_points']:+.2f} points "
                     f"drop, thresholds {r['thresholds']} ({r['train_seconds']:.0f} s)")
    if "rate" in results:
        lines.append(f"rate: {len(results['rate']['curve'])} codec/cut points")
    return "\n".join(lines)


def _lazy(module: str, name: str):
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(*args, **kwargs)

    return call


_RUNNERS = {
    "prune": run_prune,
    "int8": _lazy("quantize", "run_int8"),
    "bottleneck": _lazy("bottleneck", "run_bottleneck"),
    "exits": _lazy("exits", "run_exits"),
}
