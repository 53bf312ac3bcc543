"""The common runner: train any registered model on any registered dataset and record it in MLflow.

    python -m harness.train --model cnn_small --data synthnorb --view azimuth --epochs 10
    python -m harness.train --config studies/x.toml --set optim.lr=0.001 --set model.args.final_lambda=0.02
    python -m harness.train --resume RUN_ID             # continue an interrupted / failed / pruned run
    python -m harness.train --help

Python API (what the studies call)::

    result = fit(cfg, parent_run_id=None, tags=None, epoch_callback=None, resume_run_id=None)

One MLflow run per training (see docs/contracts.md "Tracking"). Every epoch: train loss and error,
validation error, test error (familiar / novel with a view split), a model checkpoint and the full resume
state, written atomically. ``epoch_callback(epoch, metrics) -> bool`` runs after each epoch's evaluation
and checkpoint; returning True stops the run as pruned (MLflow status KILLED). A NaN/inf loss stops the
run FAILED, keeping the last good checkpoint; Ctrl-C ends it KILLED. Both resume with ``--resume``, from
the last completed epoch, and a resumed run equals an uninterrupted one exactly on the CPU. A resume may
change only RESUME_CHANGEABLE (the learning rate, weight decay and epochs, applied from the next epoch, and
how the run executes); it is refused while the run's owner process is alive (``--force`` overrides).

Modules: ``setup`` (checks, data, model, optimiser, resume state), ``epoch`` (train and evaluate one
epoch), ``record`` (what the run logs), ``loop`` (``fit``: epoch after epoch), ``cli`` (the command
line).
"""

from harness.train.cli import main
from harness.train.loop import FitResult, fit
from harness.train.setup import NonFiniteLossError, TrainingError, check_config

__all__ = ["fit", "FitResult", "TrainingError", "NonFiniteLossError", "check_config", "main"]
