"""``python -m harness.train``: settings from defaults <- --config <- flags <- --set, then ``fit``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import models
from harness import data, losses, tracking
from harness.config import ConfigError, RunConfig, apply_overrides, dumps_toml, flatten, load_config, to_dict
from harness.errors import cli_errors
from harness.train.loop import fit
from harness.train.setup import PRECISIONS, RESUME_APPLIED


@dataclass(frozen=True)
class Flag:
    """A convenience flag that sets one config key (applied after --config, before --set)."""

    name: str
    key: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    switch: bool = False  # takes no value and sets the key to true

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


FLAGS = (
    Flag("--model", "model.name", f"registered model: {', '.join(models.list_models())}"),
    Flag("--data", "data.name", "registered dataset (harness.data.list_datasets())"),
    Flag("--view", "data.view", "novel-viewpoint split of NORB-format data", choices=data.VIEWS),
    Flag("--epochs", "train.epochs", "number of epochs", int),
    Flag("--batch-size", "data.batch_size", "training batch size", int),
    Flag("--lr", "optim.lr", "initial learning rate (0 = the model's default_lr); see optim.schedule", float),
    Flag("--loss", "loss.name", "auto = the model's default", choices=[n.value for n in losses.LossName]),
    Flag("--device", "train.device", "auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps"),
    Flag("--precision", "train.precision", "bf16 autocasts; EM routing stays float32", choices=PRECISIONS),
    Flag("--compile", "train.compile", "torch.compile the model", switch=True),
    Flag("--deterministic", "train.deterministic", "deterministic algorithms only", switch=True),
    Flag("--multicrop", "train.multicrop", "also report the multi-crop test error", switch=True),
    Flag("--seed", "train.seed", "seed of weights, data order, augmentation, dropout", int),
    Flag("--threads", "train.threads", "torch CPU threads (0 = torch's default)", int),
    Flag("--limit-train", "data.limit_train", "train on this many images (0 = all)", int),
    Flag("--limit-test", "data.limit_test", "test on this many images (0 = all)", int),
    Flag("--experiment", "experiment", "MLflow experiment"),
    Flag("--run-name", "run_name", "MLflow run name; '' = <model>-<data>[-<view>]"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.train",
        description="Train a registered model on a registered dataset; every run is recorded in MLflow "
        "(see `python -m harness.tracking uri`). Settings: defaults <- --config <- flags <- --set. "
        "Each flag names the config key it sets and that key's default.",
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML file with the settings that differ from the defaults"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any setting, e.g. --set optim.lr=0.001 --set model.args.final_lambda=0.02 "
        "(type-checked; unknown keys are errors); repeatable",
    )
    defaults = flatten(RunConfig())
    for flag in FLAGS:
        kind = (
            dict(action="store_true", default=None)
            if flag.switch
            else dict(type=flag.type, choices=flag.choices)
        )
        p.add_argument(flag.name, help=f"{flag.help} [{flag.key}, default {defaults[flag.key]!r}]", **kind)
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this run (id or a unique prefix, e.g. the 8 characters the logs print) from its last "
        f"completed epoch with its logged config; --set may change {', '.join(RESUME_APPLIED)} (applied "
        "from the next epoch) and how it runs (train.device, train.threads, ...); other keys are refused",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: resume even a RUNNING run whose process is alive or on another machine",
    )
    p.add_argument("--parent-run-id", metavar="RUN_ID", help="nest the new run under this MLflow run")
    p.add_argument(
        "--tag", metavar="KEY=VALUE", action="append", default=[], help="extra MLflow run tag; repeatable"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = [
        f"{flag.key}={_literal(value)}" for flag in FLAGS if (value := getattr(args, flag.dest)) is not None
    ]
    if args.resume:
        if args.config:
            raise ConfigError(
                "--resume uses the run's logged config; drop --config (use --set to change keys)"
            )
        return apply_overrides(tracking.load_config(args.resume), flags + args.overrides)
    return load_config(RunConfig, args.config, flags + args.overrides)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.force and not args.resume:
        raise ConfigError("--force applies to --resume only; drop it")
    if args.resume:
        args.resume = tracking.resolve_run_id(args.resume)
    if args.parent_run_id:
        args.parent_run_id = tracking.resolve_run_id(args.parent_run_id)
    cfg = config_from_args(args)
    if args.print_config:
        print(dumps_toml(to_dict(cfg)), end="")
        return 0
    tags = dict(t.split("=", 1) for t in args.tag if "=" in t)
    if len(tags) != len(args.tag):
        raise ConfigError("--tag must look like KEY=VALUE")
    fit(
        cfg,
        parent_run_id=args.parent_run_id,
        tags=tags,
        resume_run_id=args.resume,
        force_resume=args.force,
    )
    return 0


def _literal(value: Any) -> str:
    """A flag's value as the TOML literal of a ``key=value`` override."""
    return json.dumps(value) if isinstance(value, str | bool) else str(value)
