"""`python -m harness.data`: --help on every subcommand; synth -> verify -> preview on a tiny set."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.data import smallnorb as sn
from harness.data.__main__ import main


@pytest.mark.parametrize("command", [[], ["list"], ["download"], ["verify"], ["synth"], ["preview"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: python -m harness.data" in capsys.readouterr().out


def test_module_runs():
    out = subprocess.run(
        [sys.executable, "-m", "harness.data", "--help"], capture_output=True, text=True, check=True
    )
    assert "download" in out.stdout and "synth" in out.stdout


def test_synth_verify_preview(tmp_path, capsys):
    root = tmp_path / "syn"
    args = ["--root", str(root), "--quiet"]
    assert (
        main(
            [
                "synth",
                "--image-size",
                "32",
                "--lightings",
                "1",
                "--elevations",
                "1",
                "--instances",
                "1",
                *args,
            ]
        )
        == 0
    )
    assert main(["verify", "synthnorb", *args]) == 0
    assert "all files ok" in capsys.readouterr().out
    png = tmp_path / "p.png"
    assert main(["preview", "synthnorb", "--out", str(png), *args]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["preview", "synthnorb", "--split", "train", "--out", str(png), *args]) == 0
    assert main(["preview", "synthnorb", "--lighting", "4", "--out", str(png), *args]) == 2
    assert "lighting code 4 is not in synthnorb/test" in capsys.readouterr().err
    (root / sn.file_name("train", "cat")).write_bytes(b"broken")
    assert main(["verify", "synthnorb", *args]) == 1
    assert "BAD" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["preview", "smallnorb", "--root", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: smallnorb is not in") and "\n" not in err
    assert main(["synth", "--lightings", "9", "--root", str(tmp_path), "--quiet"]) == 2
    assert "lightings must be in 1..6" in capsys.readouterr().err
