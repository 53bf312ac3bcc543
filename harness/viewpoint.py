"""The paper's matched novel-viewpoint protocol (Hinton, Sabour & Frosst 2018, §5.1), as small functions.

Two models trained on the familiar viewpoints only are compared on the novel ones *at the checkpoints
where both reach the same familiar-view test error*, so that a model is not credited for simply fitting
the training views better. The rule (``match_checkpoints``):

1. Each model's reference point is its final epoch (``reference="final"``) or its best-validation epoch
   (``reference="best"``, the lowest familiar-view ``val_error``; validation comes from training files).
2. The target is the worse (higher) of the reference familiar-view test errors; the model that has it is
   the reference model and is matched at its reference epoch. On a tie the CNN is the reference.
3. Every other model is matched at its *earliest* epoch whose familiar-view test error is at or below the
   target. That epoch exists: the model's own reference point qualifies.

So if the capsule net is the better one on familiar views, it is stopped early where it first matches the
CNN (the paper's "familiar-view error matched at 3.7%"), and the reverse if the CNN is better. Novel-view
errors are then read at the matched epochs and shown side by side, with the per-(azimuth, elevation) cell
errors of the matched checkpoints (``checkpoint_cells``).

    result = match_checkpoints({"em_capsnet_small": hist_c, "cnn_small": hist_n},
                               families={"em_capsnet_small": "capsule", "cnn_small": "cnn"}, view="azimuth")
    print(format_matched(result))

With several training seeds (a study's ``seeds``), the protocol runs once per seed, pairing the models
trained with the same seed, and ``compare_seeds`` summarises the matched novel errors over seeds
(mean ± 95% t-interval) and says whether the capsule − CNN difference is larger than the seed-to-seed
spread: its paired 95% interval excludes zero *and* its size exceeds the larger of the two models'
standard deviations over seeds.

A history is the runner's per-epoch list of metric dicts (``FitResult.history``): each has ``epoch``
(1-based; the list position is used when it is absent), ``test_familiar_error``, ``test_novel_error`` and
``val_error``. Epochs without a familiar-view test error (NaN or missing) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from harness.errors import CapsbenchError
from harness.intervals import Estimate, estimate

RULE = (
    "each model's reference point is its {reference} epoch; the target is the worse reference familiar-view "
    "test error (ties: the CNN is the reference); every other model is matched at its earliest epoch with "
    "familiar-view test error <= target"
)


def azimuth_degrees(code: int) -> int:
    """A NORB azimuth code (0, 2, ..., 34) in degrees."""
    return 10 * int(code)


def elevation_degrees(code: int) -> int:
    """A NORB elevation code (0..8) in degrees."""
    return 30 + 5 * int(code)


class ViewpointError(CapsbenchError, ValueError):
    """Histories that cannot be matched (no familiar-view errors, unknown reference, ...)."""


@dataclass
class Point:
    epoch: int
    familiar_error: float
    novel_error: float


@dataclass
class MatchedModel:
    model: str
    family: str
    run_id: str | None
    matched_epoch: int
    matched_familiar_error: float
    matched_novel_error: float
    final_epoch: int
    final_familiar_error: float
    final_novel_error: float


@dataclass
class MatchResult:
    view: str
    rule: str
    reference_model: str
    target_familiar_error: float
    models: dict[str, MatchedModel] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for m in d["models"].values():
            m.pop("model")
        return d

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(m) for m in self.models.values()]).set_index("model")


# ---------------------------------------------------------------------------------------------


def points(history: Sequence[Mapping[str, Any]]) -> list[Point]:
    """(epoch, familiar error, novel error) for every epoch that has a familiar-view test error."""
    out = []
    for i, row in enumerate(history):
        fam = _num(row.get("test_familiar_error"))
        if fam is None:
            continue
        novel = _num(row.get("test_novel_error"))
        out.append(Point(int(row.get("epoch", i + 1)), fam, math.nan if novel is None else novel))
    return out


def reference_point(history: Sequence[Mapping[str, Any]], reference: str = "final") -> Point:
    """The final epoch's point, or the point of the epoch with the lowest ``val_error`` (earliest on ties)."""
    pts = points(history)
    if not pts:
        raise ViewpointError(
            "history has no test_familiar_error; train with a view split (data.view = azimuth|elevation)"
        )
    if reference == "final":
        return pts[-1]
    if reference != "best":
        raise ViewpointError(f"reference must be 'final' or 'best', got {reference!r}")
    val = {int(r.get("epoch", i + 1)): _num(r.get("val_error")) for i, r in enumerate(history)}
    scored = [(val.get(p.epoch), p) for p in pts if val.get(p.epoch) is not None]
    if not scored:
        raise ViewpointError("reference='best' needs val_error in the history; use reference='final'")
    return min(scored, key=lambda vp: (vp[0], vp[1].epoch))[1]


def earliest_at_or_below(history: Sequence[Mapping[str, Any]], target: float) -> Point | None:
    """The first epoch whose familiar-view test error is <= target (None if there is none)."""
    for p in points(history):
        if p.familiar_error <= target + 1e-12:
            return p
    return None


def match_checkpoints(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    families: Mapping[str, str],
    view: str,
    reference: str = "final",
    run_ids: Mapping[str, str] | None = None,
) -> MatchResult:
    """Choose the matched checkpoints of two (or more) models by the rule in the module docstring."""
    if len(histories) < 2:
        raise ViewpointError(f"the matched protocol compares at least two models, got {list(histories)}")
    missing = [m for m in histories if m not in families]
    if missing:
        raise ViewpointError(f"no family given for {missing}; pass families={{model: 'capsule'|'cnn'}}")
    refs = {m: reference_point(h, reference) for m, h in histories.items()}
    order = list(histories)
    # the worse model is the reference; on a tie a CNN wins, then the order given
    ref_model = max(order, key=lambda m: (refs[m].familiar_error, families[m] == "cnn", -order.index(m)))
    target = refs[ref_model].familiar_error
    result = MatchResult(view, RULE.format(reference=reference), ref_model, target)
    for m in order:
        hit = refs[m] if m == ref_model else earliest_at_or_below(histories[m], target)
        final = points(histories[m])[-1]
        result.models[m] = MatchedModel(
            model=m,
            family=families[m],
            run_id=(run_ids or {}).get(m),
            matched_epoch=hit.epoch,
            matched_familiar_error=hit.familiar_error,
            matched_novel_error=hit.novel_error,
            final_epoch=final.epoch,
            final_familiar_error=final.familiar_error,
            final_novel_error=final.novel_error,
        )
    return result


def format_matched(result: MatchResult) -> str:
    """A markdown table of the matched and final errors (percent), one row per model."""
    lines = [
        f"matched novel-viewpoint protocol ({result.view}); familiar-view target "
        f"{100 * result.target_familiar_error:.2f}% set by {result.reference_model}",
        "",
        "| model | family | matched epoch | familiar error | novel error | final epoch | final familiar "
        "| final novel |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result.models.values():
        lines.append(
            f"| {m.model} | {m.family} | {m.matched_epoch} | {_pct(m.matched_familiar_error)} | "
            f"{_pct(m.matched_novel_error)} | {m.final_epoch} | {_pct(m.final_familiar_error)} | "
            f"{_pct(m.final_novel_error)} |"
        )
    return "\n".join(lines)


def parent_metrics(result: MatchResult) -> dict[str, float]:
    """The parent-run metrics of docs/contracts.md, "Study records"."""
    out = {"viewpoint/matched_familiar_target": result.target_familiar_error}
    for m in result.models.values():
        p = f"viewpoint/{m.model}"
        out |= {
            f"{p}/matched_epoch": float(m.matched_epoch),
            f"{p}/matched_familiar_error": m.matched_familiar_error,
            f"{p}/matched_novel_error": m.matched_novel_error,
            f"{p}/final_familiar_error": m.final_familiar_error,
            f"{p}/final_novel_error": m.final_novel_error,
        }
    return {k: v for k, v in out.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------------
# several training seeds
# ---------------------------------------------------------------------------------------------


@dataclass
class SeedComparison:
    view: str
    seeds: list[int]
    families: dict[str, str]
    familiar: dict[str, Estimate]  # model -> matched familiar-view error over seeds
    novel: dict[str, Estimate]  # model -> matched novel-view error over seeds
    capsule: str | None  # the compared pair: the first capsule model and the first CNN
    cnn: str | None
    difference: Estimate | None  # capsule − CNN matched novel error, paired by seed
    spread: float  # the larger of the pair's seed-to-seed SDs of matched novel error

    @property
    def larger_than_spread(self) -> bool:
        d = self.difference
        return bool(d is not None and d.excludes_zero() and abs(d.mean) > self.spread)

    def verdict(self) -> str:
        """One sentence on the capsule − CNN difference against the seed-to-seed spread."""
        d = self.difference
        if d is None or d.n < 2:
            return "too few paired seeds to compare the difference with the seed-to-seed spread"
        diff = (
            f"the capsule − CNN difference of {100 * d.mean:+.1f} points "
            f"(95% interval {100 * d.low:+.1f} to {100 * d.high:+.1f})"
        )
        spread = f"the seed-to-seed spread (SD up to {100 * self.spread:.1f} points over {d.n} seeds)"
        if self.larger_than_spread:
            return f"{diff} is larger than {spread}"
        return f"{diff} is not larger than {spread}, so these seeds do not separate the two"

    def to_dict(self) -> dict[str, Any]:
        est = lambda e: None if e is None else asdict(e)  # noqa: E731
        return {
            "view": self.view,
            "seeds": self.seeds,
            "families": self.families,
            "familiar": {m: est(e) for m, e in self.familiar.items()},
            "novel": {m: est(e) for m, e in self.novel.items()},
            "capsule": self.capsule,
            "cnn": self.cnn,
            "difference": est(self.difference),
            "spread": self.spread,
            "larger_than_spread": self.larger_than_spread,
            "verdict": self.verdict(),
        }


def compare_seeds(results: Mapping[int, MatchResult]) -> SeedComparison:
    """Matched errors over seeds (one MatchResult per seed, the same models in each)."""
    if not results:
        raise ViewpointError("compare_seeds needs at least one seed's matched protocol")
    seeds = sorted(results)
    first = results[seeds[0]]
    families = {m: mm.family for m, mm in first.models.items()}
    per = lambda m, key: [getattr(results[s].models[m], key) for s in seeds if m in results[s].models]  # noqa: E731
    familiar = {m: estimate(per(m, "matched_familiar_error")) for m in families}
    novel = {m: estimate(per(m, "matched_novel_error")) for m in families}
    capsule = next((m for m, f in families.items() if f == "capsule"), None)
    cnn = next((m for m, f in families.items() if f == "cnn"), None)
    difference, spread = None, math.nan
    if capsule and cnn:
        pairs = [results[s].models for s in seeds if {capsule, cnn} <= set(results[s].models)]
        difference = estimate(p[capsule].matched_novel_error - p[cnn].matched_novel_error for p in pairs)
        sds = [novel[m].sd for m in (capsule, cnn) if not math.isnan(novel[m].sd)]
        spread = max(sds) if sds else math.nan
    return SeedComparison(first.view, seeds, families, familiar, novel, capsule, cnn, difference, spread)


def seed_parent_metrics(comparison: SeedComparison) -> dict[str, float]:
    """Parent-run metrics over seeds: per-model mean and 95% half-width, and the paired difference."""
    out: dict[str, float] = {"viewpoint/n_seeds": float(len(comparison.seeds))}
    for m, e in comparison.novel.items():
        out[f"viewpoint/{m}/matched_novel_error_mean"] = e.mean
        out[f"viewpoint/{m}/matched_novel_error_ci95"] = e.half
        out[f"viewpoint/{m}/matched_familiar_error_mean"] = comparison.familiar[m].mean
    if comparison.difference is not None:
        out["viewpoint/novel_error_difference"] = comparison.difference.mean
        out["viewpoint/novel_error_difference_ci95"] = comparison.difference.half
        out["viewpoint/seed_spread"] = comparison.spread
    return {k: v for k, v in out.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------------
# per-(azimuth, elevation) errors of a checkpoint
# ---------------------------------------------------------------------------------------------


def sample_indices(n: int, limit: int, seed: int = 0):
    """A seeded, sorted sample of ``limit`` of ``n`` indices (all of them when limit is 0 or >= n)."""
    import numpy as np

    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def checkpoint_cells(
    run_id: str, epoch: int, dataset, *, device: str = "cpu", batch_size: int = 128
) -> pd.DataFrame:
    """Error per (azimuth, elevation) cell of a run's checkpoint at ``epoch`` on ``dataset``.

    Columns: epoch, elevation, azimuth, n, errors, error (raw NORB codes, as in ``dataset.meta``).
    """
    from harness import evaluate, tracking

    model, _ = tracking.load_model(run_id, which=epoch, device=device)
    logits, labels = evaluate.predict(model, dataset, batch_size=batch_size, device=device)
    cells = evaluate.viewpoint_errors(logits.argmax(1), labels, dataset.meta)["cells"]
    cells.insert(0, "epoch", epoch)
    return cells[["epoch", "elevation", "azimuth", "n", "errors", "error"]]


# ---------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}%"
