"""The learning benchmark: how well, and how fast, each model learns on fixed subsets of real and synthetic
data.

    python -m harness.bench learn                 # caps vs CNN: 10,000 images of each dataset, 3 epochs
    python -m harness.bench learn --data fashion_mnist --train-images 0 --epochs 10
    python -m harness.bench learn --entry caps=em_capsnet_small \\
        --entry caps_paper=em_capsnet_small,recipe=paper --entry cnn=cnn_small

Every entry (``LABEL=MODEL[,key=value...]``: ``recipe=paper`` is short for ``model.args.recipe="paper"``,
the capsule nets' paper settings; any other ``key=value`` is a ``--set`` override for that entry alone) is
trained on every dataset with the same subset, epochs and seed by the common runner (``harness.train.fit``),
one MLflow run each in the experiment ``learnbench`` (tag ``capsbench.kind=learnbench``). The benchmark
prints a table of test error after every epoch and the training seconds, and writes ``results.csv``,
``results.md`` and ``learning_curves.png`` (test error against epoch and against training seconds,
capsules in blues and CNNs in oranges) into ``--out``.

Subsets are fixed: the first ``--train-images`` of a seeded permutation of the training files, the first
``--test-images`` of the test files' (the runner's ``data.limit_train`` / ``data.limit_test``); validation
images come from the training files, as in every run. synthnorb is the ``synthnorb_azimuth`` study's
rendering (48 px, 2 lightings, 9 elevations, all views), made in ``$CAPSBENCH_DATA/synthnorb-48px-2light``
when missing (about a minute once).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.config import ConfigError, RunConfig, apply_overrides
from harness.data import DataError
from harness.errors import cli_errors
from harness.study.config import model_family

DEFAULT_ENTRIES = ["caps=em_capsnet_small", "cnn=cnn_small"]  # each at its family's own defaults
DEFAULT_DATA = ["fashion_mnist", "synthnorb"]
EXPERIMENT = "learnbench"
SYNTHNORB_FOLDER = "synthnorb-48px-2light"  # shared with studies/synthnorb_azimuth.toml
SYNTHNORB_OPTIONS = dict(image_size=48, lightings=2, elevations=9, instances=5)


@dataclass
class Entry:
    """One model and its settings: ``LABEL=MODEL[,recipe=NAME][,key=value...]``."""

    label: str
    model: str
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Entry:
        label, sep, rest = text.partition("=")
        parts = [p.strip() for p in re.split(r",(?=\s*[\w.]+=)", rest) if p.strip()]  # commas before key=
        if not sep or not label.strip() or not parts:
            raise ConfigError(
                f"--entry {text!r} must look like LABEL=MODEL[,recipe=NAME][,key=value...], "
                "e.g. caps=em_capsnet_small,recipe=paper"
            )
        entry = cls(label.strip(), parts[0])
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key.strip() == "recipe":
                part = f"model.args.recipe={value.strip()!r}"
            entry.overrides.append(part)
        return entry


def entry_config(entry: Entry, data: str, args: argparse.Namespace) -> RunConfig:
    """An entry's run configuration on a dataset: the benchmark's settings, then --set, then the entry's."""
    common = [
        f"model.name={entry.model!r}",
        f"data.name={data!r}",
        f"data.root={str(data_folder(data))!r}",
        f"data.limit_train={args.train_images}",
        f"data.limit_test={args.test_images}",
        f"train.epochs={args.epochs}",
        f"train.seed={args.seed}",
        f"train.device={args.device!r}",
        f"train.threads={args.threads}",
        "train.save_every=0",
        f"experiment={EXPERIMENT!r}",
        f"run_name='learn · {entry.label} · {data}'",
    ]
    return apply_overrides(RunConfig(), [*common, *args.set, *entry.overrides])


def data_folder(name: str) -> Path | str:
    """Where the benchmark reads ``name`` from ("" = the dataset's default folder)."""
    from harness.data import data_root

    return data_root() / SYNTHNORB_FOLDER if name == "synthnorb" else ""


def ensure_data(name: str) -> None:
    """Render the benchmark's synthnorb when it is missing; other datasets load (or fail) as in any run."""
    if name != "synthnorb":
        return
    from harness.data import get_dataset, synthnorb

    folder = data_folder(name)
    try:
        get_dataset("synthnorb", "test", root=folder, progress=False)
    except DataError:
        print(f"rendering synthnorb into {folder} ({SYNTHNORB_OPTIONS})", flush=True)
        synthnorb.synthesize(folder, **SYNTHNORB_OPTIONS)


def run_entry(entry: Entry, data: str, args: argparse.Namespace) -> list[dict]:
    """Train one entry on one dataset; one row per epoch (test error, cumulative training seconds)."""
    from harness import train  # imports mlflow: only once a run starts

    cfg = entry_config(entry, data, args)
    result = train.fit(cfg, tags={"capsbench.kind": "learnbench", "capsbench.learnbench.entry": entry.label})
    family = model_family(cfg.model.name)
    rows, seconds = [], 0.0
    for h in result.history:
        seconds += h["epoch_train_seconds"]
        rows.append(
            dict(
                data=data,
                entry=entry.label,
                model=entry.model,
                settings=" ".join(entry.overrides),
                family=family,
                epoch=int(h["epoch"]),
                test_error=h["test_error"],
                train_error=h["train_error"],
                train_seconds=seconds,
                run_id=result.run_id,
            )
        )
    return rows


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    """Test error (%) per epoch, one row per (data, entry), plus total training seconds."""
    wide = df.pivot_table(index=["data", "entry"], columns="epoch", values="test_error", sort=False) * 100
    wide.columns = [f"epoch {c}" for c in wide.columns]
    seconds = df.groupby(["data", "entry"], sort=False)["train_seconds"].max()
    return wide.round(1).assign(train_s=seconds.round(0).astype(int)).reset_index()


def markdown_table(table: pd.DataFrame) -> str:
    from harness.report import render_markdown  # the report's table renderer

    return render_markdown([("table", table)]).rstrip("\n")


def learning_curves(df: pd.DataFrame):
    """Test error against epoch (top) and against training seconds (bottom), one column per dataset."""
    from harness.report.figures import model_colors, plt

    datasets = list(dict.fromkeys(df["data"]))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.2 * len(datasets), 7.0), squeeze=False)
    entries = df.drop_duplicates("entry")
    colors = model_colors(list(zip(entries["entry"], entries["family"], strict=True)))
    for col, data in enumerate(datasets):
        for (entry, family), g in df[df["data"] == data].groupby(["entry", "family"], sort=False):
            style = dict(color=colors[entry], marker="o" if family == "capsule" else "s", label=entry)
            axes[0, col].plot(g["epoch"], 100 * g["test_error"], **style)
            axes[1, col].plot(g["train_seconds"], 100 * g["test_error"], **style)
        axes[0, col].set_title(data)
        axes[0, col].set_xlabel("epoch")
        axes[1, col].set_xlabel("training seconds")
        for ax in axes[:, col]:
            ax.set_ylabel("test error (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_results(df: pd.DataFrame, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    table = error_table(df)
    (out / "results.md").write_text(f"`{command}`\n\n{markdown_table(table)}\n")
    fig = learning_curves(df)
    fig.savefig(out / "learning_curves.png", dpi=110)
    meta = dict(command=command, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m harness.bench learn",
        description="Train models on fixed data subsets for a few epochs and compare how they learn "
        "(test error per epoch and per training second); every run is recorded in MLflow "
        f"(experiment {EXPERIMENT!r}).",
    )
    p.add_argument(
        "--entry",
        action="append",
        default=None,
        help="LABEL=MODEL[,recipe=NAME][,key=value...]; repeatable (default: "
        f"{' '.join(DEFAULT_ENTRIES)}); recipe=paper: the capsule nets' paper settings",
    )
    p.add_argument("--data", nargs="+", default=DEFAULT_DATA, help="datasets (default: %(default)s)")
    p.add_argument(
        "--train-images", type=int, default=10_000, help="training subset, 0 = all (default: 10000)"
    )
    p.add_argument("--test-images", type=int, default=2_000, help="test subset, 0 = all (default: 2000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every entry")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for the results (default: runs/learnbench/<time>)"
    )
    return p.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        entries = [Entry.parse(e) for e in (args.entry or DEFAULT_ENTRIES)]
        for entry in entries:  # every configuration is checked before the first run starts
            for data in args.data:
                entry_config(entry, data, args)
    except ValueError as e:  # a model option the constructor refuses
        raise ConfigError(str(e)) from None
    command = " ".join(["python -m harness.bench learn", *argv])
    out = args.out or Path("runs/learnbench") / time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict] = []
    try:
        for data in args.data:
            ensure_data(data)
            for entry in entries:
                print(f"== {entry.label} ({entry.model} {' '.join(entry.overrides)}) on {data}", flush=True)
                rows += run_entry(entry, data, args)
    finally:
        if rows:
            df = pd.DataFrame(rows)
            write_results(df, out, command)
            print(markdown_table(error_table(df)))
            print(f"wrote {out}/results.md, results.csv, learning_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
