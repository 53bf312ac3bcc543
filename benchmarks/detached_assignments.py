"""Screen: does em_capsnet_small learn better when no gradient flows through the routing assignments?

    python benchmarks/detached_assignments.py     # detached: 10,000 Fashion-MNIST images, 3 epochs
    python benchmarks/detached_assignments.py --set optim.lr_decay=0.96 --out runs/learnbench/detached

Runs the learning benchmark (``python -m harness.bench learn``; its arguments pass through) for one entry,
``detached=em_capsnet_small``, with every routed layer's backward taken through its last M-step alone: the
assignments R of that step are constants, so earlier iterations (and the E-steps) pass no gradient back.
The fused CPU kernel has no such switch, so the screen runs on the fast path's PyTorch ops (the engine
CUDA uses), about half the kernel's speed; compare with the default entry of the same command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["CAPSBENCH_CPU_KERNEL"] = "0"  # before the first routing: the kernel ignores the patch below

import models.em_fast as em_fast  # noqa: E402
from harness import learnbench  # noqa: E402

_full_backward = em_fast.route_backward


def last_m_step_backward(VV, acts, beta_u, lambdas, cost_norm, normalize, steps, d_mu, d_logit):
    """``route_backward`` through the last iteration's M-step only (its R held constant)."""
    return _full_backward(VV, acts, beta_u, lambdas[-1:], cost_norm, normalize, steps[-1:], d_mu, d_logit)


def main(argv: list[str]) -> int:
    em_fast.route_backward = last_m_step_backward
    defaults = ["--data", "fashion_mnist", "--entry", "detached=em_capsnet_small"]
    return learnbench.main(defaults + argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
