"""`harness.data verify` re-hashes every file; data errors give the command that rebuilds the same data.

Issue 14 items 5 and 6 (regenerate commands). A tiny synthnorb rendered into tmp_path.
"""

import os
import re
import shlex

import pytest
from trust_support import TINY, render_tiny

from harness.data import DataError, get_dataset
from harness.data import smallnorb as sn
from harness.data.__main__ import main as data_main

RENDER_FLAGS = "--seed 0 --image-size 48 --lightings 1 --elevations 3 --instances 1"


def flip_a_byte_keeping_mtime(path):
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    for key in ("st_size", "st_mtime_ns", "st_ino"):  # what the fast checksum cache is keyed by
        assert getattr(after, key) == getattr(before, key)


def test_verify_rehashes_a_file_damaged_in_place(tmp_path, capsys):
    folder = render_tiny(tmp_path / "synthnorb")
    assert TINY == {"image_size": 48, "lightings": 1, "elevations": 3, "instances": 1}
    get_dataset("synthnorb", "train", root=folder, progress=False)  # fills the fast checksum cache
    assert data_main(["verify", "synthnorb", "--root", str(folder)]) == 0
    assert f"synthnorb in {folder}: all files ok" in capsys.readouterr().out

    dat = folder / sn.file_name("train", "dat")
    flip_a_byte_keeping_mtime(dat)
    assert data_main(["verify", "synthnorb", "--root", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f" BAD  {dat.name}: sha256 " in out and "expected" in out
    fix = f"python -m harness.data synth --root {folder} {RENDER_FLAGS}"
    assert f"synthnorb in {folder}: 1 problem(s); fix with `{fix}`" in out
    with pytest.raises(DataError, match="does not match the expected"):  # training now sees it too
        get_dataset("synthnorb", "train", root=folder, progress=False)


def test_data_errors_regenerate_with_the_recorded_options_and_root(tmp_path, capsys):
    folder = render_tiny(tmp_path / "my data")
    missing = folder / sn.file_name("test", "dat")
    missing.unlink()
    with pytest.raises(DataError) as error:
        get_dataset("synthnorb", "test", root=folder, progress=False)
    message = str(error.value)
    command = f"python -m harness.data synth --root '{folder}' {RENDER_FLAGS}"
    assert message == f"{missing} is missing; regenerate it: `{command}`"

    argv = shlex.split(re.search(r"`([^`]+)`", message).group(1))
    assert argv[:4] == ["python", "-m", "harness.data", "synth"]
    assert data_main([*argv[3:], "--quiet"]) == 0  # the command as given rebuilds the same files
    assert data_main(["verify", "synthnorb", "--root", str(folder)]) == 0
    assert "all files ok" in capsys.readouterr().out
    assert len(get_dataset("synthnorb", "test", root=folder, progress=False)) == 270
