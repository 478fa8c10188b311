"""``edgesplit``: the command line (train, demo, bench, info, profile, plan, node, linksim, certs).

Examples::

    edgesplit demo                      # local cluster on loopback, node killed halfway
    edgesplit train resnet_fm --epochs 10
    edgesplit bench accuracy --quick --json results/accuracy.json
    edgesplit profile resnet18 --device pi4 --out pi4.json    # root: under the Pi-4 class's CPU quota
    edgesplit plan resnet18 --bandwidth 5 --device pi4 --device-profile pi4.json --plot plan.png
    edgesplit node --port 8001          # same as edge-node
    edgesplit linksim --listen 127.0.0.1:9000 --target 127.0.0.1:8001 --rate 5 --delay 20
    edgesplit certs --out certs --host device --host node1=198.18.0.11,localhost
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_args import (
    BENCHMARK_NAMES,
    batch_sizes,
    fraction,
    image_file,
    json_output_file,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    port_or_off,
    positive_float,
    positive_int,
    zoo_model,
)


def _train(args: argparse.Namespace) -> int:
    import torch

    from edgesplit.models import WEIGHTS_DIR
    from edgesplit.models.train import Recipe, train

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, max_lr=args.lr, seed=args.seed,
                    train_limit=args.limit)
    from edgesplit.partitioner.flops import mac_summary

    try:
        card = train(args.model, recipe, out_dir=args.out or WEIGHTS_DIR, data_root=args.data, count_macs=mac_summary)
    except (ValueError, FileNotFoundError) as exc:  # a bad recipe, --out or --data: say what, not where
        print(f"edgesplit train: {exc}", file=sys.stderr)
        return 2
    for e in card["exits"]:
        print(f"{e['name']:>10} (cut {e['cut']}): {100 * e['test_accuracy']:.2f}% top-1")
    return 0


def _nonn_train(args: argparse.Namespace) -> int:
    import torch

    from edgesplit.partitioner.nonn.bundle import WEIGHTS_DIR
    from edgesplit.partitioner.nonn.train import NonnRecipe, train_and_save

    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [NonnRecipe(members=s, method=m, epochs=args.epochs, widths=tuple(args.widths), seed=args.seed,
                          train_limit=args.limit, validation=args.validation,
                          dropped_weight=0.0 if args.no_member_dropout else 1.0)
               for s in args.members for m in args.method]
    try:
        manifests = train_and_save(recipes, out_dir=args.out or WEIGHTS_DIR, data_root=args.data)
    except ValueError as exc:
        print(f"edgesplit nonn train: {exc}", file=sys.stderr)
        return 2
    for m in manifests:
        print(f"{m['name']:>32}: {100 * m['test_accuracy']:.2f}% top-1 with every member "
              f"({m['training_seconds']:.0f} s)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import signal

    from .demo import render_summary, run_demo

    def terminated(signum, _frame):
        # Unwind like Ctrl-C, so the node, its workers and the link emulator are stopped and
        # their folders removed: SIGTERM's default left the node serving, owned by init.
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        summary = run_demo(samples=args.samples, cut=args.cut, threshold=args.threshold, codec=args.codec,
                           deadline_s=args.deadline, kill=not args.no_kill, rate_hz=args.rate,
                           progress=not args.no_progress, device=args.device, trace=args.trace,
                           delay_ms=args.delay, compare=not args.no_compare)
    except (ValueError, OSError) as exc:  # a bad flag or trace file (a folder, unreadable): say what, not where
        print(f"edgesplit demo: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["lost"] == 0 and summary["duplicated"] == 0 else 1


def _bench(args: argparse.Namespace) -> int:
    from edgesplit.bench import BenchmarkArgumentError, run_benchmark

    try:
        run_benchmark(args.name, quick=args.quick, json_path=args.json, progress=not args.no_progress,
                      traces=args.traces, device=args.device, window_s=args.window_s, model=args.model,
                      window=args.window)
    except BenchmarkArgumentError as exc:  # found before the run: say what, not where
        print(f"edgesplit bench {args.name}: {exc}", file=sys.stderr)
        return 2
    return 0


def _info(args: argparse.Namespace) -> int:
    from edgesplit.models import build_model
    from edgesplit.partitioner.flops import block_macs

    model = build_model(args.model)
    macs = [0] + block_macs(model)
    print(f"{model.name}: {model.num_blocks} blocks, exits at cuts {model.exit_cuts}")
    print(f"{'cut':>4}  {'after':<12}{'crossing shape':<18}{'fp32 bytes':>12}{'head MACs':>14}")
    total = 0
    for cut, m in zip(model.cut_points(), macs):
        total += m
        print(f"{cut.index:>4}  {cut.name:<12}{str(list(cut.shape)):<18}{4 * cut.numel:>12}{total:>14,}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    """Profile a zoo model here, optionally under a device class's CPU quota (root: a cgroup)."""
    import torch

    from edgesplit.models import build_model
    from edgesplit.partitioner.explain import DEVICE_QUOTAS
    from edgesplit.partitioner.graph import trace
    from edgesplit.partitioner.profile import profile_graph

    quota = args.cpu_quota or (DEVICE_QUOTAS[args.device] if args.device else None)
    torch.set_num_threads(args.threads)
    model = build_model(args.model).eval()
    x = torch.zeros(1, *model.input_shape)
    graph = trace(model, (x,))
    batches = args.batches
    group, pause_s = None, 0.0
    if quota:
        from edgesplit.testbed.cgroups import CpuQuota, smooth_period_us
        from edgesplit.testbed.errors import TestbedUnavailable

        try:
            group = CpuQuota.create(f"edgesplit-profile-{os.getpid()}", quota, smooth_period_us(quota))
        except TestbedUnavailable as exc:
            print(f"edgesplit profile: {exc} (a CPU quota needs root)", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"edgesplit profile: {exc}", file=sys.stderr)
            return 2
        group.add(os.getpid())
        pause_s = 2 * smooth_period_us(quota) / 1e6  # a fresh budget per run, as between frames
    try:
        profile = profile_graph(graph, (x,), batches=batches, repeats=args.repeats, warmup=2,
                                model_name=args.model, cpu_quota=quota, pause_s=pause_s)
        from edgesplit.runtime.codec import seconds_per_element

        profile.encode_seconds_per_element, profile.decode_seconds_per_element = seconds_per_element()
    finally:
        if group is not None:
            group.remove()  # this process goes back to its parent cgroup
    try:
        profile.save(args.out)
    except OSError as exc:
        print(f"edgesplit profile: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    total = {b: 1000 * sum(v) for b, v in profile.seconds.items()}
    where = f" under a {quota:g}-core CPU quota" if quota else ""
    print(f"{args.model}: {len(profile.node_names)} nodes, "
          + ", ".join(f"batch {b}: {t:.2f} ms" for b, t in total.items()) + f"{where}; written to {args.out}")
    return 0


def _controller(args: argparse.Namespace) -> int:
    import zmq

    from edgesplit.partitioner.explain import DEVICE_QUOTAS
    from edgesplit.runtime.control.remote import serve

    try:
        return serve(args.model, DEVICE_QUOTAS[args.device], args.telemetry, args.decisions, args.policy,
                     args.slo_ms / 1000, args.accuracy_target, args.low_battery, args.heartbeat, args.curve_dir,
                     args.port_file, metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    except (ValueError, OSError) as exc:  # a malformed endpoint or key file, weights that cannot be read
        print(f"edgesplit controller: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:  # ZeroMQ refused an endpoint: say which flags it came from
        print(f"edgesplit controller: cannot bind --telemetry {args.telemetry!r} / --decisions "
              f"{args.decisions!r}: {exc}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from edgesplit.partitioner.explain import plan_rows, plot, render

    try:
        rates = [float(r) for r in args.exit_rates.split(",")] if args.exit_rates else None
        plan = plan_rows(args.model, args.bandwidth, device=args.device, rtt_ms=args.rtt, codec=args.codec,
                         edge_profile=args.edge_profile, exit_rates=rates, device_profile=args.device_profile)
    except (KeyError, ValueError) as exc:
        print(f"edgesplit plan: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a profile that cannot be read (a folder, no permission)
        print(f"edgesplit plan: cannot read {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(render(plan, limit=0 if args.all else 24))
    writing = None
    try:
        if args.json:
            writing = args.json
            Path(args.json).write_text(json.dumps(plan, indent=1))
        if args.plot:
            writing = args.plot
            plot(plan, args.plot)
            print(f"plot written to {args.plot}")
    except OSError as exc:  # exc.filename is None for a full disk: name the file ourselves
        print(f"edgesplit plan: cannot write {writing}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.out:
        from edgesplit.models import load_trained
        from edgesplit.partitioner.bundle import write_bundle

        try:
            model = load_trained(args.model)
        except FileNotFoundError:
            from edgesplit.models import build_model

            model = build_model(args.model)  # no shipped weights: random ones (latency work)
        try:
            write_bundle(model, args.out, extra={"plan": {k: v for k, v in plan.items() if k != "cuts"}})
        except OSError as exc:
            print(f"edgesplit plan: cannot write the bundle to {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"bundle written to {args.out}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    import torch

    from edgesplit.partitioner.compress.config import load_config
    from edgesplit.partitioner.compress.pipeline import run, summary
    from edgesplit.runtime.rate import run_rate

    if args.threads is not None and args.threads < 0:
        print(f"edgesplit compress: --threads must be >= 0 (0: torch's default), not {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config)
        results = run(cfg, args.steps or None, progress=not args.quiet, runners={"rate": run_rate})
    except ValueError as exc:
        print(f"edgesplit compress: {exc}", file=sys.stderr)
        return 2
    print(summary(results))
    print(f"bundles, results and plots in {cfg.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesplit", description=__doc__.split("\n")[0].strip("`: "))
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a zoo model jointly at all its exits")
    t.add_argument("model", nargs="?", default="resnet_fm", type=zoo_model)
    t.add_argument("--epochs", type=positive_int, default=10)
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate of the one-cycle schedule")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=positive_int, help="train on the first N images only")
    t.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default 0: torch's choice)")
    t.add_argument("--data", help="folder with the Fashion-MNIST IDX files (only this folder is searched)")
    t.add_argument("--out", type=output_dir,
                   help="where to write weights and card (default: the shipped weights folder)")
    t.set_defaults(func=_train)

    nn_ = sub.add_parser("nonn", help="NoNN: students on filter partitions of a teacher (train them)")
    nsub = nn_.add_subparsers(dest="nonn_command", required=True)
    nt = nsub.add_parser("train", help="train NoNN students and aggregator, write the bundles")
    nt.add_argument("--members", type=positive_int, nargs="+", default=[4, 8],
                    help="students per ensemble, at most the teacher's final filters (default: 4 8)")
    nt.add_argument("--method", nargs="+", choices=["original", "enhanced"], default=["original", "enhanced"])
    nt.add_argument("--epochs", type=positive_int, default=10)
    nt.add_argument("--widths", type=positive_int, nargs=3, default=[8, 16, 32], help="student channel widths")
    nt.add_argument("--validation", type=positive_int, default=5000, help="training images held out for validation")
    nt.add_argument("--no-member-dropout", action="store_true",
                    help="train with every member present only, as the original NoNN did (name suffix _nodrop)")
    nt.add_argument("--seed", type=int, default=0)
    nt.add_argument("--limit", type=positive_int, help="train on the first N images only")
    nt.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default 0: torch's choice)")
    nt.add_argument("--data", help="folder with the Fashion-MNIST IDX files (only this folder is searched)")
    nt.add_argument("--out", type=output_dir, help="where to write the bundles (default: the shipped folder)")
    nt.set_defaults(func=_nonn_train)

    cp = sub.add_parser("compress", help="prune with distillation, int8, bottleneck and calibrated exits, "
                        "as a TOML configuration says (resumable)")
    cp.add_argument("config", help="TOML file, e.g. partitioner/compress/configs/resnet_fm.toml")
    cp.add_argument("--steps", nargs="+", choices=["prune", "int8", "bottleneck", "exits", "rate"],
                    help="run only these steps (default: every enabled one)")
    cp.add_argument("--threads", type=int, default=0)
    cp.add_argument("--quiet", action="store_true", help="no progress bars")
    cp.set_defaults(func=_compress)

    d = sub.add_parser("demo", help="local cluster on loopback with the shipped model behind a trace-driven link; "
                       "the embedded controller picks the plan; node killed halfway")
    d.add_argument("--samples", type=int, default=300, help="requests per phase (at most 700)")
    d.add_argument("--cut", type=int, help="a fixed plan at this cut instead of the controller")
    d.add_argument("--threshold", type=float, default=0.9, help="with --cut: the exit threshold")
    d.add_argument("--codec", default="int8", choices=["fp32", "fp16", "int8", "int8-channel"],
                   help="with --cut: the fixed plan's codec; also the all-on-the-edge comparison's "
                   "(the controller picks its own among fp32, fp16 and int8) (default: int8)")
    d.add_argument("--deadline", type=float, default=1.0, help="offload deadline in seconds")
    d.add_argument("--rate", type=float, default=25.0, help="requests per second, like a camera (0: flat out)")
    d.add_argument("--device", default="mcu", choices=["pi4", "pizero2", "mcu"],
                   help="the device class, emulated by time (default: mcu, 20 times slower than this host)")
    d.add_argument("--trace", help="a '<seconds> <Mbit/s>' bandwidth trace to replay (default: a shipped 3G excerpt)")
    d.add_argument("--delay", type=float, default=2.0, help="one-way link delay in ms")
    d.add_argument("--no-compare", action="store_true", help="skip the fixed-plan replays")
    d.add_argument("--no-kill", action="store_true", help="do not kill and restart the node halfway")
    d.add_argument("--no-progress", action="store_true",
                   help="no progress bars; plan changes and node events are listed in the summary at the end")
    d.add_argument("--json", type=output_file, help="write the summary here")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="run a benchmark")
    b.add_argument("name", choices=BENCHMARK_NAMES)
    b.add_argument("--quick", action="store_true", help="about a minute")
    b.add_argument("--json", type=json_output_file,
                   help="write machine-readable results here (and the plot beside it, as .png)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--traces", help="controller: a folder of '<seconds> <Mbit/s>' bandwidth traces "
                   "(default: ../shared/traces)")
    b.add_argument("--device", choices=["pi4", "pizero2", "mcu"],
                   help="controller: the device class (CPU quota) to throttle the device to (default: pizero2)")
    b.add_argument("--model", choices=["mobilenet_v2", "resnet18", "resnet_fm"],
                   help="controller: the model split between device and edge (default: mobilenet_v2 at "
                   "224x224; resnet_fm is the shipped Fashion-MNIST model's architecture)")
    b.add_argument("--window", choices=["gain", "widest", "start"],
                   help="controller: which stretch of each trace to replay: where the oracle beats the best fixed "
                   "plan by most in the measured table (gain, the default), where the bandwidth swings most "
                   "(widest), or its start")
    b.add_argument("--window-s", type=positive_float,
                   help="controller: seconds of each trace replayed (default 45, --quick 10; longer windows "
                   "give narrower figures, the run time grows in proportion)")
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="show a model's cuts, crossing tensors and costs")
    i.add_argument("model", nargs="?", default="resnet_fm", type=zoo_model)
    i.set_defaults(func=_info)

    pr = sub.add_parser("profile", help="measure a model's per-node latency here, optionally under a device "
                        "class's CPU quota", description="Per-node latency of a zoo model on this host (median "
                        "of repeats; under a CPU quota the mean, idling between runs as a device does between "
                        "frames), saved as Profile JSON for 'edgesplit plan --device-profile/--edge-profile'.")
    pr.add_argument("model", type=zoo_model)
    pr.add_argument("--out", required=True, type=output_file, help="write the profile JSON here")
    group = pr.add_mutually_exclusive_group()
    group.add_argument("--device", choices=["pi4", "pizero2", "mcu"],
                       help="run under this device class's CPU quota (needs root: a cgroup)")
    group.add_argument("--cpu-quota", type=positive_float, help="run under this fraction of a core (needs root)")
    pr.add_argument("--repeats", type=positive_int, default=9)
    pr.add_argument("--batches", type=batch_sizes, default="1", help="comma-separated batch sizes (default: 1)")
    pr.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    pr.set_defaults(func=_profile)

    co = sub.add_parser("controller", help="decide plans for devices from their telemetry (ZeroMQ bus)",
                        description="Subscribe to telemetry, run a policy per device on the cost model, publish "
                        "decisions (cut, thresholds, codec, epoch); devices fall back to their embedded controller "
                        "when it goes silent.")
    co.add_argument("--model", default="resnet_fm", type=zoo_model)
    co.add_argument("--device", default="mcu", choices=["pi4", "pizero2", "mcu"], help="device class (CPU quota)")
    co.add_argument("--telemetry", default="tcp://127.0.0.1:5555", help="bind telemetry SUB here")
    co.add_argument("--decisions", default="tcp://127.0.0.1:5556", help="bind decision XPUB here")
    co.add_argument("--policy", default="battery", choices=["latency", "energy", "accuracy", "battery"])
    co.add_argument("--slo-ms", type=positive_float, default=200.0,
                    help="latency SLO for energy/accuracy policies, ms (default: 200)")
    co.add_argument("--accuracy-target", type=fraction, default=0.0,
                    help="least accuracy (0..1) of the exit settings the latency and energy policies may choose, "
                    "by the exits' calibration on the shipped sample (default: 0)")
    co.add_argument("--low-battery", type=fraction, default=0.3,
                    help="battery level (0..1) below which a device on battery saves energy (default: 0.3)")
    co.add_argument("--heartbeat", type=positive_float, default=1.0,
                    help="seconds between repeats of the decisions (default: 1)")
    co.add_argument("--curve-dir", help="CURVE keys: controller.key and controller.key_secret, and the public key "
                    "(NAME.key) of every client admitted; authenticates and encrypts the bus")
    co.add_argument("--port-file", type=output_file, help="write the bound endpoints here as JSON")
    co.add_argument("--metrics-port", type=port_or_off, default=-1,
                    help="serve Prometheus metrics on this port (0: any free port; default -1: none)")
    co.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (default: 127.0.0.1)")
    co.set_defaults(func=_controller)

    pl = sub.add_parser("plan", help="predict every cut's latency and choose the split",
                        description="Trace the model, profile it on this host, and predict each cut's latency "
                        "on a device class over a link; prints the table, the choice and the reason.")
    pl.add_argument("model", nargs="?", default="resnet_fm", type=zoo_model)
    pl.add_argument("--bandwidth", type=positive_float, default=5.0, help="Mbit/s, above 0 (default: 5)")
    pl.add_argument("--rtt", type=non_negative_float, default=20.0, help="round-trip time in ms (default: 20)")
    pl.add_argument("--device", default="pi4", choices=["pi4", "pizero2", "mcu"],
                    help="device class, as a CPU quota of this host (default: pi4 = 0.6 of a core)")
    pl.add_argument("--codec", default="int8", choices=["fp32", "fp16", "int8", "int8-channel"])
    pl.add_argument("--edge-profile", help="edge profile JSON measured elsewhere (default: this host)")
    pl.add_argument("--device-profile", help="device profile JSON measured on the device, e.g. "
                    "'edgesplit profile MODEL --device pi4' (default: this host's divided by the class's quota)")
    pl.add_argument("--exit-rates", help="share of inputs leaving at each early exit of the model, in order, "
                    "e.g. 0.4,0.2 (default: exits not counted)")
    pl.add_argument("--plot", type=image_file, help="write stacked bars per cut to this image (.png, .svg, .pdf)")
    pl.add_argument("--json", type=output_file, help="write the table and the choice as JSON")
    pl.add_argument("--all", action="store_true", help="list every cut (default: about 24, evenly spread)")
    pl.add_argument("--out", type=output_dir,
                    help="write the bundle (manifest.json + safetensors, hashes) to this folder")
    pl.set_defaults(func=_plan)

    from .node.settings import configure_parser as node_flags

    n = sub.add_parser("node", help="run an edge node (the same as edge-node)",
                       description="Serve a model's segments over gRPC.")
    node_flags(n)
    n.set_defaults(func=_node)

    from edgesplit.linksim import configure_parser as linksim_flags

    ls = sub.add_parser("linksim", help="run the link emulator between a device and a node",
                        description="TCP proxy that emulates a link: rate, delay, jitter, loss, outages, traces.")
    linksim_flags(ls)
    ls.set_defaults(func=_linksim)

    from .transport.tls import CERTS_DESCRIPTION, CERTS_EPILOG
    from .transport.tls import configure_parser as certs_flags

    c = sub.add_parser("certs", help="make a CA and certificates for a cluster (mutual TLS)",
                       description=CERTS_DESCRIPTION, epilog=CERTS_EPILOG)
    certs_flags(c)
    c.set_defaults(func=_certs)
    return p


def _node(args: argparse.Namespace) -> int:
    from .node.server import run

    return run(args)


def _linksim(args: argparse.Namespace) -> int:
    from edgesplit.linksim import run

    return run(args)


def _certs(args: argparse.Namespace) -> int:
    from .transport.tls import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgesplit info | head`: the reader left; nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit's own flush does not fail again
        except OSError:
            pass
        return 141
    except FileNotFoundError as exc:
        print(f"edgesplit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
