"""The matched novel-viewpoint protocol: checkpoint choice, tie rules, metrics, tables."""

import math

import numpy as np
import pytest

from harness.viewpoint import (
    ViewpointError,
    earliest_at_or_below,
    format_matched,
    match_checkpoints,
    parent_metrics,
    points,
    reference_point,
    sample_indices,
)

FAM = {"caps": "capsule", "cnn": "cnn"}


def hist(fam, novel, val=None):
    """A runner-style history: one dict per epoch (1-based)."""
    val = val or [None] * len(fam)
    return [
        {"epoch": i + 1, "test_familiar_error": f, "test_novel_error": n, "val_error": v}
        for i, (f, n, v) in enumerate(zip(fam, novel, val))
    ]


def test_capsule_better_is_stopped_where_it_first_matches_the_cnn():
    caps = hist([0.30, 0.10, 0.05, 0.03], [0.50, 0.30, 0.20, 0.15])
    cnn = hist([0.40, 0.20, 0.08], [0.60, 0.40, 0.30])
    r = match_checkpoints({"caps": caps, "cnn": cnn}, families=FAM, view="azimuth")
    assert r.reference_model == "cnn" and r.target_familiar_error == 0.08
    assert r.models["cnn"].matched_epoch == 3 and r.models["cnn"].matched_novel_error == 0.30
    # capsule: first epoch at or below 8% is epoch 3 (5%), not its final epoch 4
    assert r.models["caps"].matched_epoch == 3
    assert r.models["caps"].matched_familiar_error == 0.05 and r.models["caps"].matched_novel_error == 0.20
    assert r.models["caps"].final_epoch == 4 and r.models["caps"].final_novel_error == 0.15


def test_cnn_better_is_the_reverse():
    caps = hist([0.30, 0.12], [0.5, 0.4])
    cnn = hist([0.25, 0.11, 0.06], [0.6, 0.45, 0.35])
    r = match_checkpoints({"caps": caps, "cnn": cnn}, families=FAM, view="elevation")
    assert r.reference_model == "caps" and r.target_familiar_error == 0.12
    assert r.models["caps"].matched_epoch == 2
    assert r.models["cnn"].matched_epoch == 2 and r.models["cnn"].matched_novel_error == 0.45


def test_exact_equality_counts_as_reached_and_ties_make_the_cnn_the_reference():
    caps = hist([0.2, 0.1], [0.5, 0.3])
    cnn = hist([0.3, 0.1], [0.6, 0.4])
    r = match_checkpoints({"caps": caps, "cnn": cnn}, families=FAM, view="azimuth")
    assert r.reference_model == "cnn"
    assert r.models["caps"].matched_epoch == 2 and r.models["cnn"].matched_epoch == 2
    # order given does not change who is the reference on a tie
    r2 = match_checkpoints({"cnn": cnn, "caps": caps}, families=FAM, view="azimuth")
    assert r2.reference_model == "cnn"


def test_best_reference_uses_validation_not_test_error():
    # val is best at epoch 2, where the familiar test error is 0.15 (not the lowest test error)
    caps = hist([0.3, 0.15, 0.05], [0.5, 0.4, 0.2], val=[0.3, 0.10, 0.12])
    assert reference_point(caps, "best").epoch == 2
    assert reference_point(caps, "final").epoch == 3
    cnn = hist([0.4, 0.2], [0.6, 0.5], val=[0.4, 0.2])
    r = match_checkpoints({"caps": caps, "cnn": cnn}, families=FAM, view="azimuth", reference="best")
    assert r.reference_model == "cnn" and r.target_familiar_error == 0.2
    assert r.models["caps"].matched_epoch == 2  # earliest <= 0.2


def test_epochs_without_familiar_error_are_skipped_and_epoch_numbers_kept():
    h = [
        {"epoch": 1, "test_familiar_error": float("nan")},
        {"epoch": 2},
        {"epoch": 3, "test_familiar_error": 0.2, "test_novel_error": 0.4},
        {"epoch": 4, "test_familiar_error": 0.1},
    ]
    pts = points(h)
    assert [p.epoch for p in pts] == [3, 4] and math.isnan(pts[1].novel_error)
    assert earliest_at_or_below(h, 0.15).epoch == 4
    assert earliest_at_or_below(h, 0.05) is None
    # no "epoch" key: list position, 1-based
    assert points([{"test_familiar_error": 0.5}, {"test_familiar_error": 0.4}])[1].epoch == 2


@pytest.mark.parametrize(
    "histories, kwargs, message",
    [
        ({"caps": hist([0.1], [0.2])}, {}, "at least two models"),
        ({"caps": hist([0.1], [0.2]), "x": hist([0.1], [0.2])}, {}, "no family given"),
        ({"caps": [{"epoch": 1}], "cnn": hist([0.1], [0.2])}, {}, "data.view"),
        ({"caps": hist([0.1], [0.2]), "cnn": hist([0.1], [0.2])}, {"reference": "last"}, "'final' or 'best'"),
        ({"caps": hist([0.1], [0.2]), "cnn": hist([0.1], [0.2])}, {"reference": "best"}, "needs val_error"),
    ],
)
def test_bad_input_fails_with_a_clear_message(histories, kwargs, message):
    with pytest.raises(ViewpointError, match=message):
        match_checkpoints(histories, families=FAM, view="azimuth", **kwargs)


def test_metrics_table_and_json_follow_the_contract():
    caps = hist([0.3, 0.05], [0.5, 0.2])
    cnn = hist([0.4, 0.1], [0.6, 0.3])
    r = match_checkpoints({"caps": caps, "cnn": cnn}, families=FAM, view="azimuth", run_ids={"caps": "abc"})
    m = parent_metrics(r)
    assert m["viewpoint/caps/matched_novel_error"] == 0.2 and m["viewpoint/cnn/matched_epoch"] == 2.0
    assert m["viewpoint/matched_familiar_target"] == 0.1
    d = r.to_dict()
    assert d["models"]["caps"]["run_id"] == "abc" and d["reference_model"] == "cnn" and "rule" in d
    table = format_matched(r)
    assert "| caps | capsule | 2 | 5.00% | 20.00% |" in table and "target 10.00%" in table
    assert r.to_frame().loc["cnn", "matched_novel_error"] == 0.3


def test_sample_indices_is_seeded_sorted_and_complete_without_limit():
    a = sample_indices(100, 10, seed=3)
    assert len(a) == 10 and np.all(np.diff(a) > 0) and np.array_equal(a, sample_indices(100, 10, seed=3))
    assert np.array_equal(sample_indices(5, 0), np.arange(5)) and len(sample_indices(5, 9)) == 5
