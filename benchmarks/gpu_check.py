"""Device check: the CUDA path of the capsule nets, and how well every recipe learns, in one timed call.

    python benchmarks/gpu_check.py run --out OUT --budget-s 540 --fashion-dir DIR

Made for a borrowed accelerator machine with a fixed time budget and no MLflow (the runner's tracking
stack is not installed there): every result is a JSON line in OUT/results.jsonl. A plan is a list of
training jobs run side by side, GPU jobs all at once and CPU jobs (fused CPU routing kernel, 2 threads
each) a few at a time; each job is this script in a child process (``--job``) running the runner's loop
(the dataset's augmentation, the model's default loss, the runner's margin schedule, Adam on the runner's
default learning-rate schedule, test error after every epoch) until its epochs are done or the budget ends.

What it runs: the agreement of the CUDA fast path with the plain reference in float64; training
throughput on CUDA (harness.bench's measurement); then, side by side, one factor at a time on a
10,000-image Fashion-MNIST subset for 3 epochs (CPU jobs), the default and the paper recipe against
cnn_small on the full Fashion-MNIST for 10 epochs, and em_capsnet on the full synthnorb (96 px rendered,
6 lightings, 9 elevations, 5 instances) in fp32 and bf16 (GPU jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402
from harness import data, evaluate, losses, schedule  # noqa: E402
from harness.config import LossConfig, RunConfig  # noqa: E402
from harness.device import autocast  # noqa: E402

PAPER = dict(recipe="paper")
CAPS = "em_capsnet_small"


def job(label, model=CAPS, device="cpu", dataset="fashion_mnist", train_images=10_000, epochs=3, **kw):
    return dict(
        label=label,
        model=model,
        device=device,
        data=dataset,
        train_images=train_images,
        epochs=epochs,
        model_args=kw.pop("model_args", {}),
        lr=kw.pop("lr", 0.0),  # 0: the model's default_lr, as in the runner
        batch_size=kw.pop("batch_size", 32),
        precision=kw.pop("precision", "fp32"),
        root=kw.pop("root", ""),
    )


def plan(synthnorb_root: str) -> list[dict]:
    """One factor at a time on 10,000 Fashion-MNIST images (CPU jobs); full-scale runs on the GPU."""
    caps = [
        ("default", {}),
        ("paper", PAPER),
        ("iters3", dict(routing_iters=3)),
        ("conv1_bn", dict(conv1_norm="batch")),
        ("normal_init", dict(weight_init="normal", weight_std=0.5)),
        ("scaled_cost", dict(cost_norm="scaled", beta_a_init=[-1000.0, 500.0])),
        ("iters3_scaled", dict(routing_iters=3, cost_norm="scaled", beta_a_init=[-1000.0, 500.0])),
    ]
    jobs = [job(f"10k_{name}", model_args=args) for name, args in caps]
    jobs += [job("10k_lr1e-3", lr=1e-3), job("10k_batch64", batch_size=64)]
    jobs += [job("10k_cnn", model="cnn_small")]
    full = dict(device="cuda", train_images=0, epochs=10)
    jobs += [job("full_caps", **full), job("full_cnn", model="cnn_small", **full)]
    jobs += [job("full_caps_paper", model_args=PAPER, **full)]
    norb = dict(
        model="em_capsnet", device="cuda", dataset="synthnorb", train_images=0, epochs=30, root=synthnorb_root
    )
    jobs += [job(f"synthnorb_em_capsnet_{p}", precision=p, batch_size=64, **norb) for p in ("fp32", "bf16")]
    return jobs


def emit(out: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def run_job(spec: dict, out: Path, deadline: float) -> None:
    """One training run (child process): test error after each epoch, until done or the deadline."""
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    extra = dict(root=spec["root"]) if spec["root"] else {}
    train_ds = data.get_dataset(spec["data"], "train", progress=False, **extra)
    test_ds = data.get_dataset(spec["data"], "test", progress=False, **extra)
    if spec["train_images"]:
        train_ds = train_ds.select(
            torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))[
                : spec["train_images"]
            ].numpy()
        )
    if device.type == "cpu":
        test_ds = test_ds.select(list(range(min(2000, len(test_ds)))))
    shape = dict(
        in_channels=train_ds.in_channels, num_classes=len(train_ds.classes), input_size=train_ds.input_size
    )
    model = models.create_model(spec["model"], **shape, **spec["model_args"]).to(device)
    loss_fn = losses.get_loss(model.default_loss)
    loss_cfg = LossConfig()
    cfg = RunConfig()  # the runner's default schedule for this model, over this run's epochs
    cfg.optim.lr, cfg.train.epochs = spec["lr"] or model.default_lr, spec["epochs"]
    cfg.optim.schedule = schedule.resolve(cfg.optim.schedule, model.default_schedule)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    steps = schedule.steps_per_epoch(len(train_ds), spec["batch_size"])
    scheduler = schedule.build_scheduler(optimizer, cfg, steps)
    seconds = 0.0
    for epoch in range(1, spec["epochs"] + 1):
        model.train()
        t0 = time.perf_counter()
        batches = data.iterate(
            train_ds, spec["batch_size"], shuffle=True, train=True, seed=epoch, device=device
        )
        for step, (x, y, _) in enumerate(batches):
            margin = losses.margin_at(loss_cfg, epoch - 1 + step / steps)
            with autocast(device, spec["precision"]):
                logits = model(x)
            loss = loss_fn(logits, y, margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_s = time.perf_counter() - t0
        seconds += epoch_s
        logits, labels = evaluate.predict(
            model, test_ds, batch_size=256, device=device, precision=spec["precision"]
        )
        error = evaluate.error_rate(logits.argmax(1), labels)
        emit(
            out,
            dict(
                run=spec["label"],
                epoch=epoch,
                test_error=round(error, 4),
                train_seconds=round(seconds, 1),
                samples_per_s=round(len(train_ds) / epoch_s, 1),
                loss=round(loss.item(), 5),
            ),
        )
        if time.time() + epoch_s * 1.15 > deadline:
            emit(out, dict(run=spec["label"], stopped_after_epoch=epoch, reason="time budget"))
            break


def check_agreement(out: Path) -> None:
    """CUDA fast path vs the reference path in float64: the largest differences in output and gradient."""
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    results = {}
    for routing in ("fast", "reference"):
        torch.manual_seed(1)
        m = models.create_model(CAPS, num_classes=10, input_size=28, routing=routing).to(
            "cuda", torch.float64
        )
        logits = m(x)
        losses.spread_loss(logits, y, 0.5).backward()
        results[routing] = (logits.detach(), torch.cat([p.grad.flatten() for p in m.parameters()]))
    (lf, gf), (lr, gr) = results["fast"], results["reference"]
    emit(
        out,
        dict(
            check="cuda_fast_vs_reference_float64",
            max_abs_logit_diff=(lf - lr).abs().max().item(),
            max_rel_grad_diff=((gf - gr).abs().max() / gr.abs().max()).item(),
        ),
    )


def throughput(out: Path) -> None:
    from harness import bench

    for model in (CAPS, "em_capsnet"):
        for precision in ("fp32", "bf16"):
            spec = bench.BenchSpec(
                model=model,
                batch=64,
                competition="global",
                routing="fast",
                device="cuda",
                precision=precision,
                steps=5,
                warmup=2,
            )
            emit(out, dict(check="throughput", **bench.run_spec(spec)))


def run_plan(jobs: list[dict], out: Path, deadline: float, cpu_slots: int) -> None:
    pending = [j for j in jobs if j["device"] == "cpu"]
    running = []
    for spec in [j for j in jobs if j["device"] != "cpu"]:
        running.append(spawn(spec, out, deadline))
    while pending or running:
        running = [p for p in running if p.poll() is None]
        while pending and sum(1 for p in running if p.args[-1] == "cpu") < cpu_slots:
            running.append(spawn(pending.pop(0), out, deadline))
        time.sleep(2)


def spawn(spec: dict, out: Path, deadline: float) -> subprocess.Popen:
    log = open(out / f"{spec['label']}.log", "w")
    cmd = [sys.executable, __file__, "job", "--out", str(out), "--deadline", str(deadline)]
    return subprocess.Popen(
        [*cmd, "--spec", json.dumps(spec), "--on", spec["device"]], stdout=log, stderr=subprocess.STDOUT
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", choices=["run", "job"])
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--fashion-dir", default="", help="folder with Fashion-MNIST's four idx .gz files")
    p.add_argument("--cpu-slots", type=int, default=10, help="CPU jobs at a time (1 thread each)")
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--on", help=argparse.SUPPRESS)  # the job's device, read back by run_plan
    args = p.parse_args()
    out = Path(args.out)
    data_root = Path("/tmp/capsbench-data")
    os.environ["CAPSBENCH_DATA"] = str(data_root)
    if args.plan == "job":
        return run_job(json.loads(args.spec), out, args.deadline)
    start = time.time()
    deadline = start + args.budget_s
    out.mkdir(parents=True, exist_ok=True)
    emit(out, dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(0), cpus=os.cpu_count()))
    from harness.data import mnist

    mnist.install_from_debian(data_root / "fashion_mnist", Path(args.fashion_dir))
    from harness.data import synthnorb

    t0 = time.time()
    root = data_root / "synthnorb-96px"
    synthnorb.synthesize(root, image_size=96, lightings=6, progress=False, workers=14)
    emit(out, dict(check="synthnorb_render", seconds=round(time.time() - t0, 1)))
    for check in (check_agreement, throughput):
        try:
            check(out)
        except Exception as e:  # a failed check must not cost the training runs
            emit(out, dict(check=check.__name__, error=repr(e)))
    run_plan(plan(str(root)), out, deadline, args.cpu_slots)
    emit(out, dict(total_seconds=round(time.time() - start, 1)))


if __name__ == "__main__":
    main()
