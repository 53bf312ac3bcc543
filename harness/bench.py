"""Training/inference throughput and peak memory of registered models: fast routing vs the plain reference.

    python -m harness.bench                                       # the issue-4 targets (below), CPU
    python -m harness.bench --models em_capsnet_small@32 --competition patch --threads 2
    python -m harness.bench --models em_capsnet@16 cnn_baseline@64 --steps 5 --json bench.json
    python -m harness.bench --device cuda --precision bf16 --compile --models em_capsnet@64

For every model (``name@batch``; a bare name takes each of --batch-sizes), competition and routing path,
one fresh subprocess builds the model, runs warm-up steps, then times training steps (forward, loss,
backward, Adam step) and inference steps on synthetic [0,1] images, and reports the median samples/s.
Peak memory is the subprocess's peak RSS (``ru_maxrss``) on CPU — a fresh process per configuration,
so nothing is shared or freed early — and ``torch.cuda.max_memory_allocated`` on CUDA. Capsule nets run
each routing path (``--routing``, default fast and reference; ``fast-torch`` adds the fast path with its
fused CPU kernel turned off) side by side; the table names the engine that ran (kernel, torch-ops) and
gives each row's speed-up (wall clock and process CPU time) and memory fraction (peak RSS, and peak RSS
above the process's RSS before the first step) against the reference row of the same model, batch and
competition. Every CPU process starts from the same floor (about 700 MB here: torch's import and the
modules its optimizer imports), which bounds the peak-RSS fraction from below.
Timings on a shared machine are noisy: compare rows of one invocation (the load average is recorded),
and rerun on a quiet machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import models
from harness.config import check_model_name
from harness.device import autocast, describe, resolve_device, synchronize
from harness.errors import cli_errors
from harness.losses import get_loss, resolve_loss_name
from models import em_cpu

DEFAULT_MODELS = ["em_capsnet_small@32", "em_capsnet@16"]
EPOCH_IMAGES = 24_300  # smallNORB's training set


@dataclass
class BenchSpec:
    """One configuration to measure."""

    model: str
    batch: int
    competition: str | None = None  # capsule nets only
    routing: str | None = None  # capsule nets only: fast | fast-torch (CPU kernel off) | reference
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False
    threads: int = 2
    steps: int = 3  # timed steps (median reported)
    warmup: int = 1
    input_size: int = 32
    in_channels: int = 1
    num_classes: int = 5
    model_args: dict = field(default_factory=dict)

    def model_kwargs(self) -> dict:
        kw = dict(in_channels=self.in_channels, num_classes=self.num_classes, input_size=self.input_size)
        if self.routing is not None:
            kw.update(competition=self.competition, routing=self.routing.removesuffix("-torch"))
        return {**kw, **self.model_args}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_spec(spec: BenchSpec, progress: bool = False) -> dict:
    """Measure one configuration in this process; returns a flat record."""
    with em_cpu.disabled() if spec.routing == "fast-torch" else contextlib.nullcontext():
        return _measure(spec, progress)


def engine(spec: BenchSpec, device: torch.device) -> str | None:
    """What computes the routing: the reference, or the fast path's CPU kernel, or its PyTorch ops."""
    if spec.routing is None or spec.routing == "reference":
        return spec.routing
    return "kernel" if device.type == "cpu" and em_cpu.kernel() is not None else "torch-ops"


def _measure(spec: BenchSpec, progress: bool) -> dict:
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    torch.manual_seed(0)
    model = models.create_model(spec.model, **spec.model_kwargs()).to(device)
    if device.type == "cpu" and spec.precision == "bf16":
        raise ValueError("--precision bf16 is for CUDA here; use fp32 on CPU")
    loss_fn = get_loss(resolve_loss_name("auto", model.default_loss))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = torch.compile(model) if spec.compile else model
    g = torch.Generator().manual_seed(0)
    x = torch.rand(spec.batch, spec.in_channels, spec.input_size, spec.input_size, generator=g).to(device)
    y = torch.randint(0, spec.num_classes, (spec.batch,), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _rss_mb() if device.type == "cpu" else 0.0

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, spec.precision):
            loss = loss_fn(net(x), y, 0.2)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode(), autocast(device, spec.precision):
            net(x)

    def timed(step, n_warm, n_timed, what):
        """(warm-up wall times, timed wall times, timed process CPU times) in seconds."""
        wall, cpu = [], []
        for _ in tqdm(range(n_warm + n_timed), desc=what, leave=False, disable=not progress):
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return wall[:n_warm], wall[n_warm:], cpu[n_warm:]

    model.train()
    warm, train_times, train_cpu = timed(train_step, spec.warmup, spec.steps, "train")
    train_peak = _peak_memory_mb(device)
    model.eval()
    _, infer_times, _ = timed(infer_step, 1, spec.steps, "infer")
    train_sps = spec.batch / statistics.median(train_times)
    return dict(
        asdict(spec),
        device_name=describe(device),
        engine=engine(spec, device),
        n_params=sum(p.numel() for p in model.parameters()),
        train_samples_per_s=train_sps,
        train_step_s=statistics.median(train_times),
        train_cpu_s=statistics.median(train_cpu),  # process CPU time per step: robust on a busy machine
        first_step_s=warm[0] if warm else None,
        infer_samples_per_s=spec.batch / statistics.median(infer_times),
        peak_memory_mb=train_peak,
        baseline_rss_mb=base_rss,
        epoch_minutes=EPOCH_IMAGES / train_sps / 60,
    )


def run_isolated(spec: BenchSpec, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "harness.bench", "--worker", json.dumps(asdict(spec))]
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(asdict(spec), error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        return dict(asdict(spec), error=f"exit {proc.returncode}{killed}: {tail}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["load_avg"] = [load_before, os.getloadavg()[0]]
    return record


def add_ratios(records: list[dict]) -> None:
    """speedup and memory_fraction of each row against the reference row of its group."""
    key = lambda r: (r["model"], r["batch"], r["competition"], r["device"], r["precision"])  # noqa: E731
    refs = {key(r): r for r in records if r.get("routing") == "reference" and "error" not in r}
    for r in records:
        ref = refs.get(key(r))
        if ref is None or "error" in r:
            continue
        r["speedup"] = r["train_samples_per_s"] / ref["train_samples_per_s"]
        r["cpu_speedup"] = ref["train_cpu_s"] / r["train_cpu_s"]
        r["infer_speedup"] = r["infer_samples_per_s"] / ref["infer_samples_per_s"]
        r["memory_fraction"] = r["peak_memory_mb"] / ref["peak_memory_mb"]
        if r["baseline_rss_mb"] and ref["baseline_rss_mb"]:  # CPU: what the steps add to the process
            work, ref_work = (
                r["peak_memory_mb"] - r["baseline_rss_mb"],
                ref["peak_memory_mb"] - ref["baseline_rss_mb"],
            )
            r["working_memory_fraction"] = work / max(ref_work, 1e-9)
    # global competition's cost relative to patch, same model/batch/routing
    patch = {
        (r["model"], r["batch"], r["routing"], r["device"], r["precision"]): r
        for r in records
        if r.get("competition") == "patch" and "error" not in r
    }
    for r in records:
        p = patch.get((r["model"], r["batch"], r.get("routing"), r["device"], r["precision"]))
        if r.get("competition") == "global" and p is not None and "error" not in r:
            r["global_over_patch"] = p["train_samples_per_s"] / r["train_samples_per_s"]
            r["global_over_patch_cpu"] = r["train_cpu_s"] / p["train_cpu_s"]


def _ratio(record: dict, key: str, fmt: str) -> str:
    return format(record[key], fmt) if key in record else "-"


def format_table(records: list[dict]) -> str:
    """One row per configuration; speed-ups (wall and CPU time) and memory fraction vs the reference."""
    head = (
        f"{'model':<18}{'batch':>6} {'compet.':<8}{'routing (engine)':<22}"
        f"{'train/s':>9}{'infer/s':>9}{'peak MB':>9}"
        f"{'speedup':>9}{'cpu-time':>9}{'mem frac':>9}{'epoch min':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        left = f"{r['model']:<18}{r['batch']:>6} {r.get('competition') or '-':<8}{_routing_label(r):<22}"
        if "error" in r:
            lines.append(left + f"  FAILED: {r['error']}")
            continue
        speed = f"{r['train_samples_per_s']:>9.2f}{r['infer_samples_per_s']:>9.2f}{r['peak_memory_mb']:>9.0f}"
        ratios = f"{_ratio(r, 'speedup', '.1f'):>8}x{_ratio(r, 'cpu_speedup', '.1f'):>8}x"
        lines.append(
            left + speed + ratios + f"{_ratio(r, 'memory_fraction', '.3f'):>9}{r['epoch_minutes']:>10.1f}"
        )
    return "\n".join(lines)


def _routing_label(record: dict) -> str:
    routing, eng = record.get("routing"), record.get("engine")
    if routing is None:
        return "-"
    return routing if eng in (None, routing) else f"{routing.removesuffix('-torch')} ({eng})"


def build_specs(args) -> list[BenchSpec]:
    specs = []
    for entry in args.models:
        name, _, batch = entry.partition("@")
        check_model_name(name, "--models")
        batches = [int(batch)] if batch else args.batch_sizes
        capsule = models.create_model(name).family == "capsule"
        for b in batches:
            variants = [(c, r) for c in args.competition for r in args.routing] if capsule else [(None, None)]
            for competition, routing in variants:
                specs.append(
                    BenchSpec(
                        model=name,
                        batch=b,
                        competition=competition,
                        routing=routing,
                        device=args.device,
                        precision=args.precision,
                        compile=args.compile and routing != "reference",
                        threads=args.threads,
                        steps=args.steps,
                        warmup=args.warmup,
                        input_size=args.input_size,
                        in_channels=args.in_channels,
                        model_args=dict(_parse_model_arg(a) for a in args.model_arg),
                    )
                )
    return specs


def _parse_model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--model-arg {text!r}: write key=value, e.g. --model-arg routing_iters=2")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m harness.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, help="name or name@batch (default: %(default)s)"
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32], help="for names without @batch")
    p.add_argument("--competition", nargs="+", default=["patch", "global"], choices=["patch", "global"])
    p.add_argument(
        "--routing",
        nargs="+",
        default=["fast", "reference"],
        choices=["fast", "fast-torch", "reference"],
        help="fast: the fast path (its fused CPU kernel on CPU); fast-torch: the fast path with the "
        "kernel turned off (its PyTorch ops, as on CUDA); reference: the plain implementation "
        "(default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: CUDA autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast-path models")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per run (0 = torch default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--model-arg", action="append", default=[], help="extra constructor kwarg key=value")
    p.add_argument("--json", type=Path, default=None, help="write the records here (default: print only)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (peak memory then shared)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["learn"]:  # the learning benchmark: python -m harness.bench learn --help
        from harness import learnbench

        sys.exit(learnbench.main(argv[1:]))
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_spec(BenchSpec(**json.loads(args.worker)))))
        return []
    specs = build_specs(args)
    records = []
    for spec in tqdm(specs, desc="bench", unit="config"):
        tqdm.write(f"  {spec.model}@{spec.batch} {spec.competition or ''} {spec.routing or ''}".rstrip())
        records.append(run_spec(spec, progress=True) if args.in_process else run_isolated(spec, args.timeout))
    add_ratios(records)
    print(format_table(records))
    for r in records:
        if "working_memory_fraction" in r and r.get("routing") != "reference":
            print(
                f"{r['model']}@{r['batch']} {r['competition']} {_routing_label(r)}: working memory (peak RSS "
                f"above the pre-step RSS) {r['working_memory_fraction']:.3f} of the reference's"
            )
    for r in records:
        if "global_over_patch" in r:
            print(
                f"{r['model']}@{r['batch']} {r['routing']}: global costs {r['global_over_patch']:.2f}x patch "
                f"({r['global_over_patch_cpu']:.2f}x in process CPU time)"
            )
    load = os.getloadavg()
    print(
        f"load average now {load[0]:.1f} on {os.cpu_count()} CPUs (timings are noisy if it exceeds --threads)"
    )
    if args.json:
        meta = dict(
            command=" ".join(["python -m harness.bench", *argv]),
            torch=torch.__version__,
            machine=platform.processor() or platform.machine(),
            cpus=os.cpu_count(),
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, records=records), indent=2))
        print(f"wrote {args.json}")
    return records


@cli_errors
def cli(argv=None) -> int:
    """The command: ``main`` with its one-line errors."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
