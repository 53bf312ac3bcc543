"""Checkpoints never run code, damaged ones say which file and fall back, and they follow the umask.

Issue 14 items 1 and 6 (truncated files, permissions). Real runs of cnn_small on a tiny synthnorb in a
temporary MLflow store; the user-visible outcome is checked through the command lines.
"""

import os
import stat

import numpy as np
import pytest
import torch
from trust_support import (
    artifact,
    one_line_error,
    render_tiny,
    run_ids,
    steps,
    temp_store,
    train_run,
    truncate,
)

from harness import attack, checkpoint, tracking, train


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    yield from temp_store(tmp_path_factory)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return render_tiny(tmp_path_factory.mktemp("synthnorb"))


class RunsAShellCommand:
    """What an attacker plants: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_planted_pickle_is_refused_and_runs_nothing(data_root, tmp_path, capsys):
    run_id = train_run("planted", data_root)
    marker = tmp_path / "code-ran"
    for name in (tracking.RESUME_FILE, tracking.checkpoint_file("final")):
        torch.save({"epoch": 2, "x": RunsAShellCommand(f"touch {marker}")}, artifact(run_id, name))
    n_runs = len(run_ids())
    capsys.readouterr()

    assert train.main(["--resume", run_id, "--set", "train.epochs=3"]) == 2
    line = one_line_error(capsys)
    assert "resume.pt: refused: it holds a reference to posix.system, which could run code" in line, line
    assert attack.main(["--run-id", run_id, "--fgsm", "--n-examples", "8", "--no-checks", "--quiet"]) == 2
    assert "model_final.pt: refused" in one_line_error(capsys)

    assert not marker.exists()  # the payload never ran
    assert tracking.run_status(run_id) == "FINISHED" and steps(run_id) == [1, 2]  # the run is untouched
    assert len(run_ids()) == n_runs


def test_resume_state_is_plain_data_and_older_files_still_load(data_root, tmp_path):
    run_id = train_run("plain-data", data_root, "train.epochs=1")
    state = torch.load(artifact(run_id, tracking.RESUME_FILE), weights_only=True)  # no allow-list needed
    assert state["epoch"] == 1 and isinstance(state["rng"]["numpy"][1], list)

    # files written before RNG states were plain data hold the numpy key as an array: still accepted
    legacy = {**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}
    torch.save(legacy, tmp_path / "legacy.pt")
    loaded = checkpoint.load_resume_state(tmp_path / "legacy.pt")
    checkpoint.set_rng_state(loaded["rng"])
    assert np.random.get_state()[1].tolist() == legacy["rng"]["numpy"][1].tolist()


def test_a_truncated_resume_pt_falls_back_to_the_epoch_before(data_root, capsys):
    run_id = train_run("truncated-resume", data_root)
    truncate(artifact(run_id, tracking.RESUME_FILE))
    capsys.readouterr()

    assert train.main(["--resume", run_id[:8], "--set", "train.epochs=3"]) == 0
    err = capsys.readouterr().err
    assert "checkpoints/resume.pt is damaged or truncated" in err
    assert "resuming from the epoch before (resume_previous.pt, epoch 1)" in err
    assert steps(run_id) == [1, 2, 2, 3] and tracking.run_status(run_id) == "FINISHED"  # epoch 2 again

    for name in (tracking.RESUME_FILE, tracking.RESUME_PREVIOUS_FILE):
        truncate(artifact(run_id, name))
    assert train.main(["--resume", run_id, "--set", "train.epochs=4"]) == 2
    line = one_line_error(capsys)
    assert "resume.pt is damaged or truncated" in line and "resume_previous.pt is damaged" in line
    assert steps(run_id) == [1, 2, 2, 3] and tracking.run_status(run_id) == "FINISHED"


def test_a_truncated_model_final_pt_names_the_file_and_uses_its_epoch(data_root, capsys):
    run_id = train_run("truncated-final", data_root)
    truncate(artifact(run_id, "checkpoints/model_final.pt"))
    model, _ = tracking.load_model(run_id, "final")
    epoch2, _ = tracking.load_model(run_id, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), epoch2.state_dict().values()))
    assert "model_final.pt is damaged or truncated" in capsys.readouterr().err

    lonely = train_run("truncated-final", data_root, "train.save_every=0")  # no epoch checkpoints
    truncate(artifact(lonely, "checkpoints/model_final.pt"))
    assert attack.main(["--run-id", lonely[:8], "--fgsm", "--n-examples", "8", "--no-checks", "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "model_final.pt is damaged or truncated" in line
    assert f"rewrite it with `python -m harness.train --resume {lonely}`" in line
    assert train.main(["--resume", lonely]) == 0  # the fix the message gives
    assert tracking.load_model(lonely, "final")[0] is not None


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_checkpoints_get_the_permissions_the_umask_gives(data_root, umask):
    old = os.umask(umask)
    try:
        run_id = train_run("umask", data_root, "train.epochs=1")
    finally:
        os.umask(old)
    folder = artifact(run_id, tracking.RESUME_FILE).parent
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
