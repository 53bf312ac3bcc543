"""harness.evaluate: error rates, viewpoint tables and confusion matrices against plain loops; plots."""

import numpy as np
import pandas as pd
import pytest
import torch

from harness import evaluate


def _toy(n=400, seed=0):
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame(
        {
            "instance": rng.integers(0, 10, n),
            "elevation": rng.integers(0, 9, n),
            "azimuth": 2 * rng.integers(0, 18, n),
            "lighting": rng.integers(0, 6, n),
        }
    )
    labels = torch.as_tensor(rng.integers(0, 5, n))
    preds = torch.where(torch.as_tensor(rng.random(n) < 0.3), (labels + 1) % 5, labels)
    return preds, labels, meta


def test_error_rate_and_masked_error():
    preds, labels, _ = _toy()
    wrong = [int(p != t) for p, t in zip(preds.tolist(), labels.tolist())]
    assert evaluate.error_rate(preds, labels) == pytest.approx(sum(wrong) / len(wrong))
    mask = np.arange(len(preds)) % 3 == 0
    sub = [w for w, m in zip(wrong, mask) if m]
    assert evaluate.masked_error(preds, labels, mask) == pytest.approx(sum(sub) / len(sub))
    assert np.isnan(evaluate.masked_error(preds, labels, np.zeros(len(preds), bool)))
    with pytest.raises(ValueError, match="equal, non-empty"):
        evaluate.error_rate(preds[:3], labels[:4])


def test_viewpoint_tables_match_a_plain_loop():
    preds, labels, meta = _toy()
    tables = evaluate.viewpoint_errors(preds, labels, meta)
    counts: dict = {}
    for i in range(len(preds)):
        key = (int(meta.azimuth[i]), int(meta.elevation[i]))
        n, e = counts.get(key, (0, 0))
        counts[key] = (n + 1, e + int(preds[i] != labels[i]))
    cells = tables["cells"]
    assert len(cells) == len(counts) and cells["n"].sum() == len(preds)
    for row in cells.itertuples():
        n, e = counts[(row.azimuth, row.elevation)]
        assert (row.n, row.errors) == (n, e) and row.error == pytest.approx(e / n)
        assert tables["grid"].loc[row.elevation, row.azimuth] == pytest.approx(e / n)
    light = tables["lighting"].set_index("lighting")
    for k in range(6):
        sel = meta.lighting.to_numpy() == k
        assert light.loc[k, "error"] == pytest.approx(float((preds[sel] != labels[sel]).double().mean()))
    js = evaluate.viewpoint_tables_to_json(tables)
    assert set(js) == {"cells", "lighting", "azimuth", "elevation"} and isinstance(js["cells"][0], dict)
    with pytest.raises(ValueError, match="metadata"):
        evaluate.viewpoint_errors(preds, labels, None)


def test_confusion_matrix_and_plots(tmp_path):
    preds, labels, meta = _toy()
    cm = evaluate.confusion_matrix(preds, labels, 5)
    ref = np.zeros((5, 5), int)
    for p, t in zip(preds.tolist(), labels.tolist()):
        ref[t, p] += 1
    assert (cm == ref).all()
    grid = evaluate.viewpoint_errors(preds, labels, meta)["grid"]
    for path in (
        evaluate.plot_viewpoint_heatmap(grid, tmp_path / "h.png", view="azimuth"),
        evaluate.plot_viewpoint_heatmap(grid, tmp_path / "e.png", view="elevation"),
        evaluate.plot_confusion(cm, ["a", "b", "c", "d", "e"], tmp_path / "c.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multicrop_averages_the_softmax_over_a_crop_grid():
    from harness.data.base import ArrayDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 40, 40), generator=g, dtype=torch.uint8)
    ds = ArrayDataset("toy", "test", images, torch.tensor([0, 1, 2]), None, ["a", "b", "c"], 32, {})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3)).double()
    model_f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3))
    model_f.load_state_dict(model.state_dict())
    logp, labels = evaluate.predict_multicrop(model_f, ds, batch_size=2, stride=8)
    x = images.double() / 255
    ref = (
        sum(model(x[:, :, dy : dy + 32, dx : dx + 32]).softmax(1) for dy in (0, 4, 8) for dx in (0, 4, 8)) / 9
    )
    assert torch.allclose(logp.double().exp(), ref, atol=1e-5) and labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="multi-crop needs images larger"):
        small = ArrayDataset("toy", "test", images[:, :, :32, :32], labels, None, ["a", "b", "c"], 32, {})
        evaluate.predict_multicrop(model_f, small)
