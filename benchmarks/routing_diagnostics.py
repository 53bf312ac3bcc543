"""What EM routing does iteration by iteration: why a third iteration hurts em_capsnet_small.

    python benchmarks/routing_diagnostics.py                  # default vs paper recipe, ~2 min on 2 cores
    python benchmarks/routing_diagnostics.py --steps 300 --recipes paper default --iters 2 3

For each recipe, a net is trained for ``--steps`` Adam steps on Fashion-MNIST (batch 32, the recipe's own
loss; the spread loss at margin 0.5), then every routed layer is re-run on a fixed batch with the plain
reference routing stopped after t = 1, 2, ... iterations. Per layer and t it prints:
- ``entropy``: the entropy of each child's assignments over the parent types of one receptive field
  (renormalised there under global competition), divided by its value under uniform assignments
  (1 = uniform, 0 = everything to one parent type);
- ``max_R``: the largest of those renormalised assignments;
- ``floor``: the fraction of parent variances within 2x of the variance floor;
- ``act_std``: the spread of the layer's output activations;
- for the class layer, ``acc``: accuracy on the batch if routing stopped after t iterations.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import models  # noqa: E402
from harness.data import get_dataset, iterate  # noqa: E402
from harness.losses import get_loss  # noqa: E402
from models.capsules import ClassCaps, ConvCaps  # noqa: E402
from models.em_routing import em_routing  # noqa: E402


def trained_net(recipe: str, iters: int | None, steps: int, train_ds) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, input_size=28, recipe=recipe)
    if iters:
        kwargs["routing_iters"] = iters
    model = models.create_model("em_capsnet_small", **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = get_loss(model.default_loss)
    model.train()
    batches = iterate(train_ds, 32, shuffle=True, train=True, seed=0)
    for _, (x, y, _) in zip(range(steps), batches, strict=False):
        loss = loss_fn(model(x), y, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def layer_inputs(model, x) -> dict[str, tuple]:
    """The (poses, activations) each routed layer receives on batch x."""
    captured = {}
    for name, layer in model.named_modules():
        if isinstance(layer, ConvCaps | ClassCaps):
            layer.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, i))
    with torch.no_grad():
        model(x)
    return captured


def route_stats(layer, poses, acts, iterations: int) -> dict[str, float]:
    """Re-run ``layer`` with the reference routing stopped after ``iterations``; statistics of that pass."""
    seen = {}

    def route(votes, a, normalize=None, return_logits=False):
        lams = layer.inverse_temperatures[:iterations]
        kw = dict(cost_norm=layer.cost_norm, var_floor=layer.var_floor, return_assignments=True)
        if normalize is not None:
            kw["normalize"] = normalize
        mu, act, R = em_routing(votes, a, layer.beta_u, layer.beta_a, lams, **kw, return_logits=return_logits)
        V = votes.float()
        Rp = R * a[..., None]
        var = (Rp[..., None] * (V - mu[..., None, :, :]) ** 2).sum(-3) / Rp.sum(-2).clamp_min(1e-30)[
            ..., None
        ]
        seen.update(R=R, var=var, act=act)
        return mu, act

    saved = layer.routing, layer._route
    layer.routing, layer._route = "reference", route
    try:
        with torch.no_grad():
            if isinstance(layer, ClassCaps):
                _, logits = layer(poses, acts, return_logits=True)
            else:
                layer(poses, acts)
                logits = None
    finally:
        layer.routing, layer._route = saved
        del layer._route  # back to the class's method
    R = seen["R"]  # (..., I, J); under global competition a child's row spreads over several positions
    cond = R / R.sum(-1, keepdim=True).clamp_min(1e-30)  # over the J parent types at this position
    present = R.sum(-1) > 1e-6
    entropy = -(cond.clamp_min(1e-30).log() * cond).sum(-1) / math.log(R.shape[-1])
    out = dict(
        entropy=entropy[present].mean().item(),
        max_R=cond.max(-1).values[present].mean().item(),
        floor=(seen["var"] < 2 * layer.var_floor).float().mean().item(),
        act_std=(torch.sigmoid(seen["act"]) if logits is not None else seen["act"]).std().item(),
    )
    return out, logits


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=["paper", "default"], help="paper | default")
    p.add_argument(
        "--iters",
        nargs="+",
        type=int,
        default=[0],
        help="routing iterations to train with (0 = the recipe's)",
    )
    p.add_argument("--steps", type=int, default=150, help="training steps before the measurement")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    train_ds = get_dataset("fashion_mnist", "train", root=args.data_root, progress=False)
    test_ds = get_dataset("fashion_mnist", "test", root=args.data_root, progress=False)
    x, y, _ = next(iterate(test_ds, 256, shuffle=False, train=False, seed=0))
    for recipe in args.recipes:
        for iters in args.iters:
            model = trained_net("capsbench" if recipe == "default" else recipe, iters, args.steps, train_ds)
            T = len(model.class_caps.inverse_temperatures)
            print(f"\n{recipe} recipe, trained with {T} iterations for {args.steps} steps")
            print(
                f"{'layer':12s} {'t':>2s} {'entropy':>8s} {'max_R':>6s} {'floor':>6s} {'act_std':>8s} "
                f"{'acc':>6s}"
            )
            for name, (poses, acts) in layer_inputs(model, x).items():
                layer = model.get_submodule(name)
                for t in range(1, max(T, 3) + 1):
                    stats, logits = (
                        route_stats(layer, poses, acts, t)
                        if t <= T
                        else route_stats(_extended(layer, t), poses, acts, t)
                    )
                    acc = (
                        f"{(logits.argmax(1) == y).float().mean().item():6.3f}" if logits is not None else ""
                    )
                    print(
                        f"{name:12s} {t:2d} {stats['entropy']:8.3f} {stats['max_R']:6.3f} "
                        f"{stats['floor']:6.3f} "
                        f"{stats['act_std']:8.4f} {acc:>6s}" + ("  (beyond training)" if t > T else "")
                    )


def _extended(layer, t: int):
    """The layer with its λ schedule continued to t iterations (same ratio as its last step)."""
    lams = list(layer.inverse_temperatures)
    ratio = lams[-1] / lams[-2] if len(lams) > 1 and lams[-2] else 1.0
    while len(lams) < t:
        lams.append(lams[-1] * ratio if math.isfinite(ratio) else lams[-1])
    layer.inverse_temperatures = tuple(lams)
    return layer


if __name__ == "__main__":
    main()
