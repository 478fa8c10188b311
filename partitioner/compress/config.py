"""The configuration of ``edgesplit compress CONFIG``: a TOML file, one table per step.

Unknown keys and values of the wrong type are refused with the key's full name, so a typo
never silently falls back to a default. Every step can be turned off with
``enabled = false``. Paths are relative to the configuration file.

Example::

    >>> cfg = parse({"compress": {"base": "resnet_fm"}, "prune": {"removed": 0.9}})
    >>> cfg.prune.removed, cfg.prune.distill.temperature
    (0.9, 4.0)
    >>> try:
    ...     parse({"prune": {"remove": 0.9}})
    ... except ValueError as exc:
    ...     print(str(exc)[:40])
    unknown key prune.remove; known keys: di
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgesplit.models.resnet_fm import EXIT_HEADS

from .distill import DistillRecipe

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class General:
    base: str = "resnet_fm"  # the zoo model whose shipped weights are compressed
    out: str = "out"  # where bundles, results and plots go (checkpoints in out/checkpoints)
    validation: int = 5000
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0


@dataclass
class PruneConfig:
    enabled: bool = True
    importance: str = "magnitude"  # magnitude, bn_scale or taylor
    global_pruning: bool = True
    isomorphic: bool = False  # global ranking only among groups of the same structure
    removed: float | str = 0.9  # fraction of parameters removed, or "knee"
    # Hand-set widths instead of a removed fraction: a convolution's module path (a
    # "blocks.4.conv1" key) to its output channels; its coupled group follows. Set, it
    # replaces removed, the importance ranking across layers and the sweep.
    widths: dict[str, int] = field(default_factory=dict)
    sweep_rates: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    steps: int = 3  # iterative prune-and-fine-tune steps
    finetune_epochs: int = 1  # after each step
    distill: DistillRecipe = field(default_factory=DistillRecipe)  # the final distillation
    # A pruned bundle to continue from (its widths and weights) instead of pruning the base
    # anew: one more distillation cycle on a finished student. Relative to this file.
    start_from: str | None = None
    # Weights of the base architecture (relative to this file) whose final logits are averaged
    # with the shipped model's to teach the student: an ensemble teacher. Hints still come from
    # the shipped model.
    extra_teachers: list[str] = field(default_factory=list)


@dataclass
class Int8Config:
    enabled: bool = True
    engine: str = "x86"  # x86 here, qnnpack for ARM
    calibration_images: int = 2000
    latency_batches: list[int] = field(default_factory=lambda: [1, 32])


@dataclass
class BottleneckConfig:
    enabled: bool = True
    # [cut, code channels, stride (spatial reduction)] of each bottleneck to train
    candidates: list[list[int]] = field(default_factory=lambda: [[7, 2, 2], [7, 4, 2], [7, 8, 2], [4, 4, 4]])
    epochs: int = 2
    finetune_epochs: int = 1  # end to end, the edge tail unfrozen
    batch_size: int = 128
    max_lr: float = 0.01
    kd_weight: float = 0.9
    temperature: float = 4.0
    max_drop_points: float = 1.0  # the best cut is the fewest bytes within this drop (validation)
    seed: int = 0


@dataclass
class ExitsConfig:
    enabled: bool = True
    cuts: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 7])
    epochs: int = 4
    batch_size: int = 128
    max_lr: float = 0.05
    temperature: float = 4.0
    kd_weight: float = 0.9  # self-distillation: the final exit teaches the others
    max_drop_points: float = 0.5  # budget against the final exit, on validation
    confidence_z: float = 1.645  # the budget holds for the drop's upper confidence bound (0: the point estimate)
    freeze_backbone: bool = True  # train only the heads; False trains the whole network jointly
    # Weights of the base network to put the exits on (relative to this file; its card beside
    # it); default: the shipped ones. A backbone that never saw the validation split keeps
    # the calibration honest: the shipped one was trained on all 60,000 training images.
    backbone: str | None = None
    confidence: list[str] = field(default_factory=lambda: ["max_softmax", "entropy"])
    # The heads: unset keeps the base model's own heads where it has them (new ones "conv");
    # "conv" (strided 3x3 conv, 0.9 M MACs at a resnet_fm cut) or "light" (depthwise +
    # pointwise, about 7x cheaper) makes every head new, of that kind.
    head: str | None = None


@dataclass
class RateConfig:
    enabled: bool = True
    test_images: int | None = None  # all of the test set by default


@dataclass
class CompressConfig:
    compress: General = field(default_factory=General)
    prune: PruneConfig = field(default_factory=PruneConfig)
    int8: Int8Config = field(default_factory=Int8Config)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    root: Path = Path(".")

    @property
    def out_dir(self) -> Path:
        out = Path(self.compress.out)
        return out if out.is_absolute() else self.root / out


def _check(value, hint, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table")
        return _build(hint, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            try:
                return _check(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where} = {value!r} has the wrong type (expected {hint})")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table")
        nested = next((k for k, v in value.items() if isinstance(v, dict) and args[1] is not dict), None)
        if nested is not None:  # TOML reads an unquoted dotted key as tables
            raise ValueError(f"{where}.{nested} is a table, not a value: quote a dotted key "
                             f"(\"{nested}.…\" = …)")
        return {_check(k, args[0], f"{where} key"): _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{where} must be empty")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ValueError(f"{where} = {value!r} must be a {hint.__name__}")
    return value


def _build(cls, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "root"}
    unknown = sorted(set(table) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown key {prefix}{unknown[0]}; known keys: {', '.join(sorted(names))}")
    values = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in table.items()}
    return cls(**values)


def _relative_to(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def parse(table: dict, root: Path = Path(".")) -> CompressConfig:
    """A validated configuration from a parsed TOML table."""
    cfg = _build(CompressConfig, table, "")
    cfg.root = root
    if cfg.prune.importance not in ("magnitude", "bn_scale", "taylor"):
        raise ValueError(f"prune.importance must be magnitude, bn_scale or taylor, not {cfg.prune.importance!r}")
    if isinstance(cfg.prune.removed, str) and cfg.prune.removed != "knee":
        raise ValueError(f"prune.removed must be a fraction or \"knee\", not {cfg.prune.removed!r}")
    if cfg.prune.isomorphic and not cfg.prune.global_pruning:
        raise ValueError("prune.isomorphic ranks channels globally within each structure: it needs "
                         "prune.global_pruning = true")
    if isinstance(cfg.prune.removed, float) and not 0 < cfg.prune.removed < 1:
        raise ValueError(f"prune.removed must be between 0 and 1, not {cfg.prune.removed}")
    if cfg.int8.engine not in ("x86", "fbgemm", "qnnpack"):
        raise ValueError(f"int8.engine must be x86, fbgemm or qnnpack, not {cfg.int8.engine!r}")
    for c in cfg.bottleneck.candidates:
        if len(c) != 3 or c[1] < 1 or c[2] not in (1, 2, 4):
            raise ValueError(f"bottleneck.candidates entries are [cut, channels >= 1, stride 1, 2 or 4], not {c}")
    if any(not 0 <= r < 1 for r in cfg.prune.sweep_rates):
        raise ValueError(f"prune.sweep_rates must lie in [0, 1), not {cfg.prune.sweep_rates}")
    if cfg.prune.removed == "knee" and len(cfg.prune.sweep_rates) < 3:
        raise ValueError("prune.removed = \"knee\" needs at least three prune.sweep_rates")
    for name, value in (("prune.steps", cfg.prune.steps), ("prune.finetune_epochs", cfg.prune.finetune_epochs),
                        ("prune.distill.epochs", cfg.prune.distill.epochs),
                        ("bottleneck.epochs", cfg.bottleneck.epochs),
                        ("bottleneck.finetune_epochs", cfg.bottleneck.finetune_epochs),
                        ("exits.epochs", cfg.exits.epochs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if not cfg.exits.cuts:
        raise ValueError("exits.cuts must name at least one cut")
    _check_values(cfg)
    if cfg.prune.widths and cfg.prune.start_from is not None:
        raise ValueError("prune.widths prunes the base model; prune.start_from continues a pruned one: set one")
    if any(w < 1 for w in cfg.prune.widths.values()):
        raise ValueError(f"prune.widths must be at least 1 channel each, not {cfg.prune.widths}")
    if cfg.prune.start_from is not None:
        cfg.prune.start_from = str(_relative_to(cfg.prune.start_from, root))
        if not (Path(cfg.prune.start_from) / "manifest.json").is_file():
            raise ValueError(f"prune.start_from: {cfg.prune.start_from} is not a bundle (no manifest.json)")
    cfg.prune.extra_teachers = [str(_relative_to(t, root)) for t in cfg.prune.extra_teachers]
    for teacher in cfg.prune.extra_teachers:
        if not Path(teacher).is_file():
            raise ValueError(f"prune.extra_teachers: no weights file {teacher}")
    if cfg.exits.backbone is not None:
        cfg.exits.backbone = str(_relative_to(cfg.exits.backbone, root))
    if cfg.exits.head is not None and cfg.exits.head not in EXIT_HEADS:
        raise ValueError(f"exits.head must be one of {', '.join(EXIT_HEADS)}, not {cfg.exits.head!r}")
    bad = sorted(set(cfg.exits.confidence) - {"max_softmax", "entropy"})
    if bad:
        raise ValueError(f"exits.confidence lists {bad}; use max_softmax and/or entropy")
    return cfg


def _check_values(cfg: CompressConfig) -> None:
    """Values of the right type that would still fail deep inside a run, or quietly do
    something other than asked (a negative limit slices from the end, a temperature of 0
    trains on NaN): refused here, with the key's name."""
    from edgesplit.models import MODELS, build_model

    if cfg.compress.base not in MODELS:
        raise ValueError(f"compress.base: no model {cfg.compress.base!r:.60} in the zoo ({', '.join(sorted(MODELS))})")
    blocks = build_model(cfg.compress.base).num_blocks
    d = cfg.prune.distill
    positive = {"prune.distill.batch_size": d.batch_size, "bottleneck.batch_size": cfg.bottleneck.batch_size,
                "exits.batch_size": cfg.exits.batch_size, "int8.calibration_images": cfg.int8.calibration_images,
                "compress.validation": cfg.compress.validation, "prune.distill.n_hints": d.n_hints,
                "compress.train_limit": cfg.compress.train_limit, "compress.test_limit": cfg.compress.test_limit,
                "rate.test_images": cfg.rate.test_images}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or left out), not {value}")
    for name, value in (("prune.distill.temperature", d.temperature), ("bottleneck.temperature",
                        cfg.bottleneck.temperature), ("exits.temperature", cfg.exits.temperature),
                        ("prune.distill.max_lr", d.max_lr), ("bottleneck.max_lr", cfg.bottleneck.max_lr),
                        ("exits.max_lr", cfg.exits.max_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, not {value}")
    if isinstance(d.hints, str) and d.hints != "cluster":
        raise ValueError(f"prune.distill.hints must be \"cluster\" or a list of cuts, not {d.hints!r:.40}")
    cuts = {"prune.distill.hints": [] if isinstance(d.hints, str) else d.hints,
            "bottleneck.candidates": [c[0] for c in cfg.bottleneck.candidates], "exits.cuts": cfg.exits.cuts}
    for name, values in cuts.items():
        for cut in values:
            if not 1 <= cut < blocks:
                raise ValueError(f"{name}: cut {cut} is not inside {cfg.compress.base} (cuts 1..{blocks - 1})")


def load_config(path: str | Path) -> CompressConfig:
    """Read and validate a TOML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no configuration at {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    return parse(table, path.parent)
