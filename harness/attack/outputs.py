"""What a person reads of an ``AttackReport``: the printed table, results.json / results.csv and the
accuracy-vs-ε plot (flags in red)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.attack.settings import EPS_UNITS, WORST, AttackName  # noqa: E402
from harness.attack.suite import AttackReport  # noqa: E402
from harness.attack.sweep import curves  # noqa: E402

EPS_SHORT = "eps in [0,1] pixel units of the model input"
LINE_STYLES = {"ce": ":", "margin": "--", WORST: "-"}


def format_report(report: AttackReport) -> str:
    """The printed table: accuracy (and targeted success) per attack/loss by ε, then the masking flags."""
    fmt = "{:.3f}".format
    head = f"{report.model_name or 'model'}" + (f"  run {report.run_id}" if report.run_id else "")
    lines = [
        f"{head}  |  {report.settings.get('data', f'{report.n_examples} examples')}  |  "
        f"clean accuracy {report.clean_accuracy:.3f}",
        f"eps: {EPS_UNITS}",
        "",
        f"untargeted accuracy by eps ({EPS_SHORT}; correct on clean and adversarial input):",
        _eps_table(curves(report.table, "untargeted")).to_string(float_format=fmt),
    ]
    if (report.table["mode"] == "targeted").any():
        lines += [
            "",
            f"targeted success by eps ({EPS_SHORT}; mean over all target classes != true class):",
            _eps_table(curves(report.table, "targeted")).to_string(float_format=fmt),
        ]
    lines += ["", format_flags(report.flags, report.settings.get("checks", True))]
    lines += [f"  note: {n}" for n in report.checks.get("notes", [])]
    return "\n".join(lines)


def format_flags(flags: Sequence[str], checked: bool = True) -> str:
    if not flags:
        if not checked:
            return "gradient-masking checks: NOT RUN (--no-checks); robustness numbers are unverified"
        return "gradient-masking checks: all passed (no flags)"
    return "\n".join(
        [f"GRADIENT-MASKING FLAGS ({len(flags)}): these numbers may overstate robustness"]
        + [f"  ! {f}" for f in flags]
    )


def _eps_table(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table.columns = [f"eps={e:g}" for e in table.columns]
    return table


def summary_table(reports: Sequence[AttackReport]) -> pd.DataFrame:
    """Models side by side: worst-case untargeted accuracy per attack by ε (plus a flags count)."""
    frames = []
    for r in reports:
        t = r.table[(r.table["mode"] == "untargeted") & (r.table["loss"] == WORST)]
        wide = t.pivot_table(index="attack", columns="eps", values="accuracy", sort=False)
        wide.columns = [f"eps={e:g}" for e in wide.columns]
        wide.insert(0, "model", r.model_name)
        wide["flags"] = len(r.flags)
        frames.append(wide.reset_index().set_index(["model", "attack"]))
    return pd.concat(frames) if frames else pd.DataFrame()


def write_outputs(report: AttackReport, folder: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.csv`` and ``accuracy_vs_eps.png`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "results.json",
        "csv": folder / "results.csv",
        "png": folder / "accuracy_vs_eps.png",
    }
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    table = report.table.assign(eps_units=EPS_UNITS, masking_flags="; ".join(report.flags))
    table.to_csv(paths["csv"], index=False)
    plot_report(report, paths["png"])
    return paths


def plot_report(report: AttackReport, path: str | Path) -> Path:
    """Accuracy vs ε (left) and targeted success vs ε (right), one line per attack/loss; flags in red."""
    modes = ["untargeted"] + (["targeted"] if (report.table["mode"] == "targeted").any() else [])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        table = curves(report.table, mode)
        for (attack, loss), values in table.iterrows():  # colour = attack, line style = loss
            color = f"C{[a.value for a in AttackName].index(attack)}"
            style = LINE_STYLES.get(loss, "-.")
            ax.plot(
                table.columns,
                values.to_numpy(),
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"{attack}/{loss}",
            )
        ax.set_xlabel("ε (L∞, [0,1] pixel units of the model input)")
        ax.set_ylabel("accuracy" if mode == "untargeted" else "targeted success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{mode}", fontsize=10)
    fig.suptitle(
        f"{report.model_name or 'model'} (clean accuracy {report.clean_accuracy:.3f}, "
        f"{report.n_examples} examples)\nε: L∞ budget in [0,1] pixel units of the model input",
        fontsize=10,
    )
    bottom = 0.0
    if report.flags:  # wrapped to the figure's width (~19 characters per inch at 7 pt), room kept below
        lines = [f"GRADIENT-MASKING FLAGS ({len(report.flags)}):"]
        lines += [w for f in report.flags for w in textwrap.wrap(f"! {f}", int(19 * fig.get_figwidth()))]
        bottom = min(0.45, 0.03 + 0.028 * len(lines))
        fig.text(0.01, 0.01, "\n".join(lines), color="red", fontsize=7, va="bottom")
    elif not report.settings.get("checks", True):
        bottom = 0.05
        fig.text(0.01, 0.01, "gradient-masking checks not run: unverified", color="gray", fontsize=7)
    fig.tight_layout(rect=(0, bottom, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
