"""harness/bench.py at a tiny size: a smoke check of the table, JSON and ratios (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from harness import bench
from harness.config import ConfigError
from models import em_cpu


def test_bench_tiny_in_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--models",
        "em_capsnet_small@2",
        "--competition",
        "patch",
        "global",
        "--routing",
        "fast",
        "fast-torch",
        "reference",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    argv += ["--input-size", "28", "--threads", "1", "--in-process", "--json", str(out)]
    records = bench.main(argv)
    assert [(r["competition"], r["routing"]) for r in records] == [
        (c, r) for c in ("patch", "global") for r in ("fast", "fast-torch", "reference")
    ]
    kernel = "kernel" if em_cpu.kernel() is not None else "torch-ops"
    assert [r["engine"] for r in records[:3]] == [kernel, "torch-ops", "reference"]
    for r in records:
        assert "error" not in r, r
        assert r["train_samples_per_s"] > 0 and r["infer_samples_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["speedup"] > 0 and r["cpu_speedup"] > 0 and r["memory_fraction"] > 0
    assert records[2]["speedup"] == 1.0  # the reference against itself
    assert records[3]["global_over_patch"] > 0 and records[3]["global_over_patch_cpu"] > 0
    saved = json.loads(out.read_text())
    assert saved["meta"]["command"].startswith("python -m harness.bench") and len(saved["records"]) == 6
    table = capsys.readouterr().out
    assert "em_capsnet_small" in table and "reference" in table and "speedup" in table
    assert "fast (torch-ops)" in table


def test_bench_subprocess_isolation_and_cnn(tmp_path):
    """One configuration in a fresh interpreter (how peak RSS is measured); CNNs have no routing rows."""
    records = bench.main(["--models", "cnn_small@2", "--steps", "1", "--warmup", "0", "--threads", "1"])
    assert len(records) == 1 and records[0]["routing"] is None
    assert "error" not in records[0], records[0]
    assert records[0]["peak_memory_mb"] > records[0]["baseline_rss_mb"] > 0


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--models", "em_capsnet_small", "--steps", "0"])
    with pytest.raises(ConfigError, match="unknown model 'em_capsnet_smal'"):
        bench.main(["--models", "em_capsnet_smal@2", "--in-process"])
    assert bench.cli(["--models", "em_capsnet_smal@2", "--in-process"]) == 2
    with pytest.raises(SystemExit, match="key=value"):
        bench.main(["--models", "cnn_small@2", "--model-arg", "dropout", "--in-process"])
