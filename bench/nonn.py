"""NoNN benchmark: accuracy as members fail, for the original and the enhanced partitioning,
against the teacher; sizes and bytes; and a live multi-host run with members killed mid-stream.

No training: it evaluates the committed ensembles (``edgesplit nonn train`` makes them).

1. For each committed ensemble, every member's answer on the 10,000 test images is computed
   once; then for each number of failed members (0 to S-1) the aggregator classifies with
   the others, averaged over every failure set (all of them: at most C(8,4) = 70).
2. Parameters and MACs per student against the teacher; bytes per inference (the int8
   image to every member, their float32 answers back) against head/tail splitting.
3. Multi-host (root: network namespaces): a device, one node per member and one serving
   the teacher, each in its own namespace, the device's link shaped with tbf. With every
   member up, the device measures latency and bytes of the ensemble and of head/tail
   splitting; then it streams test images while half the members are killed with SIGKILL
   (when a quarter of the stream is answered) and restarted; the stream goes on until the
   restarted members answer again. Reported: requests the device issued (counted before
   each ``classify``), those with an answer, lost (a ``classify`` that raised is recorded
   as an error, not an answer) and duplicated (both must be 0), accuracy, and how many
   members answered while half of them were down. A ``classify`` that hangs fails the run
   at its time bound.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from edgesplit.bench import machine_info, table
from edgesplit.bench.chaos import AnswerCount

MAX_FAILURE_SETS = 100  # more than this many sets of failed members: a seeded random sample
MEMBER_PORT = 8001
LINK_MBIT = 20.0
KILL_AT_FRACTION = 0.25
RESTART_TIMEOUT_S = 120.0


def failure_sets(members: int, failed: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Every set of ``failed`` members, or a seeded sample of MAX_FAILURE_SETS when there are more."""
    sets = list(itertools.combinations(range(members), failed))
    if len(sets) > MAX_FAILURE_SETS:
        sets = random.Random(seed).sample(sets, MAX_FAILURE_SETS)
    return sets


@torch.no_grad()
def failure_curve(ensemble, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Accuracy with 0..S-1 members failed, averaged over the failure sets."""
    from edgesplit.partitioner.nonn.train import accuracy

    answers = [torch.cat([student(x[k : k + 1000]) for k in range(0, len(x), 1000)])
               for student in ensemble.students]
    s = ensemble.members
    rows = []
    for failed in range(s):
        accs = []
        for down in failure_sets(s, failed):
            present = torch.ones(len(y), s)
            present[:, list(down)] = 0
            accs.append(accuracy(ensemble.aggregator, answers, y, present))
        rows.append({"partitioning": ensemble.partition.method, "members": s, "failed": failed,
                     "accuracy": round(statistics.fmean(accs), 4), "min_accuracy": round(min(accs), 4),
                     "max_accuracy": round(max(accs), 4), "failure_sets": len(accs), "ensemble": ensemble.name})
    return rows


def _sizes(ensemble) -> dict:
    members = ensemble.manifest["student"]["members"]
    return {"per_student": [m["params"] for m in members], "max": max(m["params"] for m in members),
            "total": sum(m["params"] for m in members), "macs_per_student": [m["macs"] for m in members]}


def _bytes(ensemble) -> dict:
    from edgesplit.runtime.codec import encoded_nbytes

    image = encoded_nbytes((1, 28, 28), "int8")
    answers = 4 * sum(len(ensemble.partition.member_filters(i)) for i in range(ensemble.members))
    return {"sent": ensemble.members * image, "received": answers, "total": ensemble.members * image + answers}


def _head_tail_bytes(teacher) -> dict:
    from edgesplit.runtime.codec import encoded_nbytes

    logits = 4 * teacher.num_classes
    return {f"cut{c.index}": encoded_nbytes(c.shape, "int8") + logits for c in teacher.cut_points()[:-1]}


def evaluate(progress: bool = True) -> dict:
    """Parts 1 and 2: failure curves, sizes and bytes of every committed ensemble."""
    from edgesplit.models import load_trained
    from edgesplit.models.datasets import load_fashion_mnist, to_tensor
    from edgesplit.models.train import evaluate_exits
    from edgesplit.partitioner.flops import mac_summary
    from edgesplit.partitioner.nonn.bundle import load_ensemble, shipped_ensembles

    names = shipped_ensembles()
    if not names:
        raise SystemExit("no committed NoNN ensembles; train them with 'edgesplit nonn train'")
    images, labels = load_fashion_mnist("test")
    x, y = to_tensor(images), torch.from_numpy(labels).long()
    teacher = load_trained("resnet_fm")
    # The teacher as deployed for inference: its final-exit path (the early-exit heads are not counted).
    teacher_params = sum(p.numel() for name, p in teacher.named_parameters() if not name.startswith("exits."))
    rows, rows_nodrop, params, bytes_, training = [], [], {"teacher": teacher_params}, {}, {}
    bytes_["head_tail"] = _head_tail_bytes(teacher)
    for name in names:
        if progress:
            print(f"nonn: evaluating {name}", flush=True)
        ensemble = load_ensemble(name)
        dropout = bool(ensemble.manifest["recipe"].get("dropped_weight", 1.0))
        curve = [{**r, "member_dropout": dropout} for r in failure_curve(ensemble, x, y)]
        (rows if dropout else rows_nodrop).extend(curve)
        params[name] = _sizes(ensemble)
        bytes_[name] = _bytes(ensemble)
        training[name] = {"seconds": ensemble.manifest["training_seconds"],
                          "epochs": ensemble.manifest["recipe"]["epochs"],
                          "validation_accuracy": ensemble.manifest["validation_accuracy"],
                          "group_sizes": [len(p) for p in ensemble.partition.parts]}
    return {"rows": rows, "teacher_accuracy": round(evaluate_exits(teacher, x, y)[-1], 4), "student_params": params,
            "teacher_macs": sum(mac_summary(teacher)["blocks"]),
            "bytes_per_inference": bytes_, "training": training, "goals": goals(rows),
            # The original NoNN as published trains with every member present; these ensembles
            # do the same (``edgesplit nonn train --no-member-dropout``).
            "rows_without_member_dropout": rows_nodrop,
            "goals_without_member_dropout": goals(rows_nodrop),
            "goals_against_original_without_member_dropout": goals(rows, rows_nodrop)}


def goals(rows: list[dict], original_rows: list[dict] | None = None) -> dict:
    """The issue's goals, per member count: retention and margin at S/2 failed, gap to the teacher.

    The enhanced figures come from ``rows``; the original's from ``original_rows`` when given.
    """
    out = {}
    originals = rows if original_rows is None else original_rows
    by = {("enhanced", r["members"], r["failed"]): r["accuracy"] for r in rows if r["partitioning"] == "enhanced"}
    by.update({("original", r["members"], r["failed"]): r["accuracy"]
               for r in originals if r["partitioning"] == "original"})
    for s in sorted({r["members"] for r in rows}):
        half = s // 2
        if ("enhanced", s, half) not in by or ("original", s, half) not in by:
            continue
        out[f"S{s}"] = {
            "failed": half,
            "enhanced_all_up": by[("enhanced", s, 0)],
            "enhanced_at_half": by[("enhanced", s, half)],
            "original_at_half": by[("original", s, half)],
            "enhanced_retention": round(by[("enhanced", s, half)] / by[("enhanced", s, 0)], 4),
            "margin_points": round(100 * (by[("enhanced", s, half)] - by[("original", s, half)]), 2),
            "ratio_to_original": round(by[("enhanced", s, half)] / by[("original", s, half)], 3),
        }
    return out


class _Follower:
    """The records appended to a JSON-lines file since the last call (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset = path, 0

    def new(self) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


def _start_all(nodes) -> None:
    """Start nodes in parallel; raise the first failure, or TimeoutError past RESTART_TIMEOUT_S in all."""
    errors: list[BaseException] = []

    def start(node) -> None:
        try:
            node.start()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    end = time.monotonic() + RESTART_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    if any(t.is_alive() for t in threads):
        for node in nodes:  # a start still waiting sees its process gone and returns
            node.kill()
        for t in threads:
            t.join(10)
        raise TimeoutError(f"nodes did not start within {RESTART_TIMEOUT_S} s")
    if errors:
        raise errors[0]


def multihost(ensemble_name: str, requests: int, latency_requests: int, rate: float, seed: int = 0,
              progress: bool = True) -> dict:
    """Part 3, on the test bed (root)."""
    from edgesplit.partitioner.nonn.bundle import load_ensemble
    from edgesplit.runtime.node.launcher import NodeProcess
    from edgesplit.testbed.bed import Testbed

    if os.geteuid() != 0:
        raise SystemExit("the NoNN benchmark's multi-host run builds network namespaces: run it as root")
    ensemble = load_ensemble(ensemble_name, members=[0])
    s = ensemble.members
    hosts = {"device": "198.18.0.1", "teacher": "198.18.0.11", **{f"m{i}": f"198.18.0.{31 + i}" for i in range(s)}}
    work = Path(tempfile.mkdtemp(prefix="edgesplit-nonn-"))
    out_path, stop_file = work / "answers.jsonl", work / "stop"
    answered = AnswerCount(out_path)
    rng = random.Random(seed)
    victims = sorted(rng.sample(range(s), s // 2))
    events: list[dict] = []
    node_args = ["--workers", "1", "--worker-threads"]
    with Testbed(hosts) as bed:
        bed.shape("device", rate_mbit=LINK_MBIT)
        members = [NodeProcess(model=None, host=bed.address(f"m{i}"), port=MEMBER_PORT, metrics_port=-1,
                               extra_args=["--nonn", ensemble_name, "--member", str(i), *node_args],
                               command_prefix=bed.exec_prefix(f"m{i}"), log_path=work / f"m{i}.log")
                   for i in range(s)]
        teacher = NodeProcess(model="resnet_fm", host=bed.address("teacher"), port=MEMBER_PORT, metrics_port=-1,
                              extra_args=node_args, command_prefix=bed.exec_prefix("teacher"),
                              log_path=work / "teacher.log")
        device = None
        try:
            if progress:
                print(f"nonn: starting {s} member nodes and the teacher's node", flush=True)
            _start_all([*members, teacher])
            device = bed.exec("device", [
                sys.executable, "-m", "edgesplit.bench.nonn_device", "--ensemble", ensemble_name,
                "--members", ",".join(f"{bed.address(f'm{i}')}:{MEMBER_PORT}" for i in range(s)),
                "--teacher", f"{bed.address('teacher')}:{MEMBER_PORT}", "--requests", str(requests),
                "--rate", str(rate), "--latency-requests", str(latency_requests), "--out", str(out_path),
                "--stop-file", str(stop_file),
            ], stdout=subprocess.PIPE, text=True)
            first = json.loads(device.stdout.readline() or "{}")
            if "latency" not in first:
                raise RuntimeError(f"device failed before streaming: {first}; see {work}")
            if device.stdout.readline().strip() != "ready":
                raise RuntimeError(f"device did not start streaming; see {work}")
            kill_at = max(1, int(requests * KILL_AT_FRACTION))
            deadline = time.monotonic() + 2 * RESTART_TIMEOUT_S + 4 * requests / max(rate, 1)
            while answered() < kill_at:
                if device.poll() is not None:
                    raise RuntimeError(f"device exited before the kill point; see {work}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the stream did not reach {kill_at} answers; see {work}")
                time.sleep(0.005)
            for i in victims:
                members[i].kill()
            events.append({"event": "killed", "members": victims, "answered": answered(), "t": time.time()})
            if progress:
                print(f"nonn: killed members {victims} at answer {events[-1]['answered']}; restarting", flush=True)
            _start_all([members[i] for i in victims])
            events.append({"event": "restarted", "members": victims, "answered": answered(), "t": time.time()})
            # Let the stream run on until an answer has every member in it again (reconnect
            # backoff and the members' circuit breakers take a moment), then tell the device
            # it may stop once it has sent what was asked.
            follower = _Follower(out_path)
            while device.poll() is None and not any(
                    len(r["answered"]) == s for r in follower.new() if r["id"] >= events[-1]["answered"]):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"members did not answer again after the restart; see {work}")
                time.sleep(0.05)
            stop_file.touch()
            try:
                device.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"device still streaming past its bound; see {work}") from None
            if device.returncode != 0:
                raise RuntimeError(f"device exited {device.returncode}; see {work}")
            sent = json.loads(device.stdout.read().strip().splitlines()[-1])["done"]
        finally:
            if device is not None and device.poll() is None:
                device.kill()
                device.wait()
            for node in [*members, teacher]:
                node.close()
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    shutil.rmtree(work, ignore_errors=True)  # kept (and named in the error) only when the run fails
    result = analyse_stream(records, sent, events, s)
    result.update(ensemble=ensemble_name, victims=victims, link_mbit=LINK_MBIT, rate_hz=rate,
                  latency=first["latency"])
    return result


def analyse_stream(records: list[dict], sent: int, events: list[dict], members: int) -> dict:
    errors = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    ids = [r["id"] for r in records]
    killed = next(e for e in events if e["event"] == "killed")
    restarted = next(e for e in events if e["event"] == "restarted")
    during = [r for r in records if killed["t"] <= r["t"] <= restarted["t"]]
    after = [r for r in records if r["t"] > restarted["t"]]
    back = next((r for r in after if len(r["answered"]) == members), None)
    how = {k: sum(r["how"] == k for r in records) for k in ("all", "partial", "fallback")}
    return {
        "sent": sent, "answered": len(set(ids)), "lost": sent - len(set(ids)), "duplicated": len(ids) - len(set(ids)),
        "errors": [e["error"] for e in errors][:10],
        "accuracy": round(sum(r["correct"] for r in records) / max(1, len(records)), 4),
        "accuracy_while_down": round(sum(r["correct"] for r in during) / len(during), 4) if during else None,
        "answers_while_down": len(during),
        "mean_members_answering_while_down": round(statistics.fmean(len(r["answered"]) for r in during), 2)
        if during else None,
        "how": how,
        "killed_at_answer": killed["answered"], "restarted_at_answer": restarted["answered"],
        "restarted_mid_stream": restarted["answered"] < sent,
        "all_members_back_s": round(back["t"] - restarted["t"], 3) if back else None,
        "p50_ms": round(1000 * statistics.median(r["latency_s"] for r in records), 3),
        "p99_ms": round(1000 * sorted(r["latency_s"] for r in records)[int(0.99 * (len(records) - 1))], 3),
    }


def run(quick: bool = False, progress: bool = True, seed: int = 0) -> dict:
    if os.geteuid() != 0:  # before the evaluation, so nobody waits for a run that cannot finish
        raise SystemExit("the NoNN benchmark's multi-host run builds network namespaces: run it as root")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = evaluate(progress)
    ensemble = "nonn_resnet_fm_s4_enhanced" if quick else "nonn_resnet_fm_s8_enhanced"
    result["multihost"] = multihost(ensemble, requests=600 if quick else 3000,
                                    latency_requests=50 if quick else 300, rate=40.0, seed=seed, progress=progress)
    result["machine"] = machine_info()
    return result


def render(r: dict) -> str:
    by = {(x["partitioning"], x["members"], x["failed"]): x for x in r["rows"]}
    lines = [f"teacher (resnet_fm) test accuracy: {100 * r['teacher_accuracy']:.2f}%", ""]
    for s in sorted({x["members"] for x in r["rows"]}):
        rows = []
        for failed in range(s):
            o, e = by.get(("original", s, failed)), by.get(("enhanced", s, failed))
            if not (o or e):
                continue
            rows.append([failed, f"{100 * o['accuracy']:.2f}" if o else "-", f"{100 * e['accuracy']:.2f}" if e else "-",
                         (o or e)["failure_sets"]])
        lines += [f"S = {s} members: accuracy (%) averaged over every set of failed members",
                  table(["failed", "original", "enhanced", "sets"], rows), ""]
    nodrop = r.get("rows_without_member_dropout") or []
    if nodrop:
        by_n = {(x["partitioning"], x["members"], x["failed"]): x for x in nodrop}
        for s in sorted({x["members"] for x in nodrop}):
            rows = [[f, *(f"{100 * by_n[(m, s, f)]['accuracy']:.2f}" if (m, s, f) in by_n else "-"
                          for m in ("original", "enhanced"))] for f in range(s)]
            lines += [f"S = {s}, trained with every member present (as the original NoNN): accuracy (%)",
                      table(["failed", "original", "enhanced"], rows), ""]
    for title, key in (("same recipe", "goals"), ("without member dropout", "goals_without_member_dropout"),
                       ("shipped enhanced vs original without member dropout",
                        "goals_against_original_without_member_dropout")):
        for size, g in (r.get(key) or {}).items():
            lines.append(f"[{title}] {_goal_line(size, g, r['teacher_accuracy'])}")
    m = r.get("multihost")
    if m:
        lat = m["latency"]
        lines += ["", f"multi-host ({m['ensemble']}, device link {m['link_mbit']} Mbit/s tbf):",
                  table(["how", "p50 ms", "p95 ms", "sent B", "received B", "accuracy"],
                        [[k, v["p50_ms"], v["p95_ms"], v["sent_bytes"], v["received_bytes"], v["accuracy"]]
                         for k, v in lat.items()]),
                  f"stream: sent {m['sent']}, answered {m['answered']}, lost {m['lost']}, duplicated "
                  f"{m['duplicated']}; accuracy {100 * m['accuracy']:.2f}%; members {m['victims']} killed at answer "
                  f"{m['killed_at_answer']}, restarted by {m['restarted_at_answer']}; while down "
                  f"{m['mean_members_answering_while_down']} members answered on average, accuracy "
                  f"{m['accuracy_while_down']}; all back {m['all_members_back_s']} s after the restart"]
    return "\n".join(lines)


def _goal_line(size: str, g: dict, teacher: float) -> str:
    return (f"{size}: enhanced keeps {100 * g['enhanced_retention']:.1f}% of its all-up accuracy with "
            f"{g['failed']} failed (goal >= 85%), {g['margin_points']:+.2f} points over the original "
            f"(goal >= +5), all-up {100 * (teacher - g['enhanced_all_up']):.2f} points below the teacher (goal <= 2)")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({x["members"] for x in r["rows"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, s in zip(axes[0], sizes):
        for source, suffix, alpha in (("rows", "", 1.0), ("rows_without_member_dropout", ", no member dropout", 0.45)):
            for method, style in (("original", "o--"), ("enhanced", "s-")):
                pts = sorted((x["failed"], 100 * x["accuracy"]) for x in r.get(source) or []
                             if x["members"] == s and x["partitioning"] == method)
                if pts:
                    ax.plot(*zip(*pts), style, alpha=alpha, label=method + suffix)
        ax.axhline(100 * r["teacher_accuracy"], color="grey", lw=1, label="teacher")
        ax.set_xticks(range(s))
        ax.set(title=f"NoNN, S = {s} students (Fashion-MNIST test)", xlabel="failed members",
               ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
