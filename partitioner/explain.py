"""``edgesplit plan``: the per-cut table (device ms, bytes, transfer ms, edge ms, total), the
choice and why, and a stacked-bar plot.

Device classes are CPU quotas of this host (a Raspberry Pi 4 is about 0.6 of one of its
cores; see deploy/testbed): without a profile measured on the device, the device profile is
this host's profile divided by the class's quota, and the table says so. An edge profile
measured elsewhere (for example on a GPU server, ``Profile.save``) can be given instead of
this host's.

Example::

    >>> rows = plan_rows("resnet_fm", bandwidth_mbit=5.0, device="pi4", repeats=2)
    >>> rows["choice"]["cut"] in [r["cut"] for r in rows["cuts"]]
    True
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .cost import PI4, DevicePower, Exit, Link, predict
from .cuts import block_cuts, enumerate_cuts
from .graph import trace
from .optimise import choose
from .profile import Profile, median_seconds, profile_graph

# Fraction of one core of this host that behaves like each device class (deploy/testbed).
DEVICE_QUOTAS = {"pi4": 0.6, "pizero2": 0.15, "mcu": 0.05}
POWER = {"pi4": PI4, "pizero2": DevicePower("pizero2", 1.5), "mcu": DevicePower("mcu", 0.3)}


def _example(model_name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from edgesplit.models import build_model

    model = build_model(model_name).eval()
    return model, torch.zeros(1, *model.input_shape)


def _exits(model, graph, rates: list[float], quota: float, repeats: int) -> list[Exit]:
    """The model's early exits at their graph cuts, with rates and device time of their heads."""
    if len(rates) != len(model.exit_cuts):
        raise ValueError(f"{model.name} has {len(model.exit_cuts)} exits (at blocks {model.exit_cuts}); "
                         f"got {len(rates)} rates")
    where = block_cuts(model, graph)
    exits = []
    with torch.no_grad():
        for cut, rate in zip(model.exit_cuts, rates):
            h = model.run(torch.zeros(1, *model.input_shape), 0, cut)
            seconds = median_seconds(lambda c=cut, x=h: model.exit_logits(c, x), repeats)
            exits.append(Exit(where[cut], rate, seconds / quota))
    return exits


def _load_matching(path: str, node_names: list[str]) -> Profile:
    """The profile at ``path`` if it times every node of the graph (``node_names``) at batch 1; else ValueError."""
    profile = Profile.load(path)  # checks one finite, non-negative time per node and batch
    if profile.node_names != node_names:
        raise ValueError(f"{path} was taken on another graph ({len(profile.node_names)} nodes, "
                         f"this one has {len(node_names)}); profile the same model")
    if 1 not in profile.seconds:
        raise ValueError(f"{path} has no batch-1 timings (batches {sorted(profile.seconds)}); "
                         "profile with --batches 1")
    return profile


def plan_rows(model_name: str, bandwidth_mbit: float, device: str = "pi4", rtt_ms: float = 20.0,
              codec: str = "int8", edge_profile: str | None = None, repeats: int = 5,
              exit_rates: list[float] | None = None, device_profile: str | None = None) -> dict:
    """Predicted cost of every cut and the least-latency choice, as plain numbers.

    ``exit_rates``: the share of inputs that leave at each of the model's early exits (in
    order); each cut's cost is then the expectation over inputs (``cost.predict``).
    ``device_profile``: a profile measured on the device (``edgesplit profile``, e.g. under
    the class's CPU quota) instead of this host's divided by the quota.
    """
    if device not in DEVICE_QUOTAS:
        raise ValueError(f"unknown device class {device!r}; choose one of {sorted(DEVICE_QUOTAS)}")
    if not math.isfinite(bandwidth_mbit) or bandwidth_mbit <= 0:
        raise ValueError(f"bandwidth must be a finite number of Mbit/s above 0, not {bandwidth_mbit}")
    if not math.isfinite(rtt_ms) or rtt_ms < 0:
        raise ValueError(f"round-trip time must be a finite number of ms >= 0, not {rtt_ms}")
    model, x = _example(model_name)
    graph = trace(model, (x,))
    cuts = enumerate_cuts(graph)
    names = [n.name for n in graph.nodes]
    # Profiles given are checked before this host's is measured: a wrong file fails at once.
    measured = _load_matching(device_profile, names) if device_profile else None
    edge = _load_matching(edge_profile, names) if edge_profile else None
    host = profile_graph(graph, (x,), repeats=repeats, warmup=2, model_name=model_name)
    quota = DEVICE_QUOTAS[device]
    if measured is not None:
        mine = measured
        quota = mine.cpu_quota or 1.0
        device_source = (f"{device_profile}: measured on {mine.host}"
                         + (f" under a {mine.cpu_quota:g}-core quota" if mine.cpu_quota else ""))
    else:
        mine = dataclasses.replace(host, seconds={b: [t / quota for t in v] for b, v in host.seconds.items()},
                                   cpu_quota=quota)
        device_source = f"this host ({host.host}) / {quota} (predicted, not measured on a {device})"
    edge = edge if edge is not None else host
    link = Link(bandwidth_mbit, rtt_ms / 1000)
    exits = _exits(model, graph, exit_rates, quota, repeats) if exit_rates else []
    preds = predict(cuts, mine, edge, link, codec=codec, power=POWER[device], exits=exits)
    best = choose(preds)
    last = cuts[-1].index
    by_cut = {c.index: c for c in cuts}
    rows = [{"cut": p.cut, "after": by_cut[p.cut].after, "device_ms": 1000 * p.device_s, "bytes": p.bytes,
             "transfer_ms": 1000 * p.transfer_s, "edge_ms": 1000 * p.edge_s, "total_ms": 1000 * p.total_s,
             "energy_mj": 1000 * p.energy_j} for p in preds]
    all_device = next(r for r in rows if r["cut"] == last)
    all_edge = next(r for r in rows if r["cut"] == 0)
    if best.cut == last:
        reason = (f"everything on the device: sending the input ({all_edge['bytes']} bytes, "
                  f"{all_edge['transfer_ms']:.1f} ms) and running it on the edge takes {all_edge['total_ms']:.1f} ms, "
                  f"more than the {all_device['device_ms']:.1f} ms the device needs")
    elif best.cut == 0:
        reason = (f"send the input ({all_edge['bytes']} bytes, {all_edge['transfer_ms']:.1f} ms) and run everything "
                  f"on the edge: the device would need {all_device['device_ms']:.1f} ms")
    else:
        row = next(r for r in rows if r["cut"] == best.cut)
        reason = (f"cut {best.cut} (after {row['after']}): {row['device_ms']:.1f} ms on the device shrink what "
                  f"crosses to {row['bytes']} bytes (the input is {all_edge['bytes']}), {row['transfer_ms']:.1f} ms "
                  f"to send, then {row['edge_ms']:.1f} ms on the edge; beats all on the device "
                  f"({all_device['total_ms']:.1f} ms) and all on the edge ({all_edge['total_ms']:.1f} ms)")
    return {
        "model": model_name, "device": device, "device_quota": quota, "bandwidth_mbit": bandwidth_mbit,
        "rtt_ms": rtt_ms, "codec": codec, "edge_profile": edge_profile or f"this host ({host.host})",
        "exits": [{"cut": e.cut, "rate": e.rate, "device_ms": 1000 * e.seconds} for e in exits],
        "device_profile": device_source,
        "cuts": rows, "choice": {"cut": best.cut, "total_ms": 1000 * best.total_s, "reason": reason},
    }


def render(plan: dict, limit: int = 0) -> str:
    """The per-cut table and the choice (``limit``: show at most that many cuts, evenly spread)."""
    rows = plan["cuts"]
    if limit and len(rows) > limit:
        step = max(1, len(rows) // limit)
        keep = {r["cut"] for r in rows[::step]} | {rows[-1]["cut"], plan["choice"]["cut"]}
        rows = [r for r in rows if r["cut"] in keep]
    lines = [f"{plan['model']} on a {plan['device']}-class device ({plan['device_profile']}), edge: "
             f"{plan['edge_profile']}, {plan['bandwidth_mbit']:g} Mbit/s, RTT {plan['rtt_ms']:g} ms, "
             f"codec {plan['codec']}", ""]
    if plan.get("exits"):
        shown = ", ".join(f"cut {e['cut']} ({e['rate']:.0%} of inputs, head {e['device_ms']:.2f} ms)"
                          for e in plan["exits"])
        lines[-1:-1] = [f"early exits: {shown}; every column is the expectation over inputs"]
    lines.append(f"{'cut':>4} {'after':<24}{'device ms':>10}{'bytes':>9}{'transfer ms':>12}{'edge ms':>9}"
                 f"{'total ms':>10}")
    for r in rows:
        mark = "  <- chosen" if r["cut"] == plan["choice"]["cut"] else ""
        lines.append(f"{r['cut']:>4} {r['after'][:23]:<24}{r['device_ms']:>10.2f}{r['bytes']:>9}"
                     f"{r['transfer_ms']:>12.2f}{r['edge_ms']:>9.2f}{r['total_ms']:>10.2f}{mark}")
    lines += ["", f"choice: cut {plan['choice']['cut']}, {plan['choice']['total_ms']:.2f} ms predicted — "
                  f"{plan['choice']['reason']}"]
    return "\n".join(lines)


def plot(plan: dict, path: str) -> None:
    """Stacked bars per cut (device, transfer, edge) with the optimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan["cuts"]
    xs = list(range(len(rows)))
    device = [r["device_ms"] for r in rows]
    transfer = [r["transfer_ms"] for r in rows]
    edge = [r["edge_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.12), 4))
    ax.bar(xs, device, label="device", color="tab:blue")
    ax.bar(xs, transfer, bottom=device, label="transfer", color="tab:orange")
    ax.bar(xs, edge, bottom=[d + t for d, t in zip(device, transfer)], label="edge", color="tab:green")
    chosen = next(i for i, r in enumerate(rows) if r["cut"] == plan["choice"]["cut"])
    ax.annotate("chosen", (chosen, rows[chosen]["total_ms"]), xytext=(0, 12), textcoords="offset points",
                ha="center", arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("cut (nodes on the device)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{plan['model']}: {plan['device']}-class device, {plan['bandwidth_mbit']:g} Mbit/s (predicted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
