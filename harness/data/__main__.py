"""Data command line: fetch, check, make and look at the datasets.

    python -m harness.data list
    python -m harness.data download smallnorb [--root DIR] [--force]   # also fashion_mnist, mnist
    python -m harness.data verify [smallnorb|synthnorb] [--root DIR]
    python -m harness.data synth [--root DIR] [--seed 0] [--image-size 96] [--lightings 6] [--elevations 9]
    python -m harness.data preview synthnorb [--out PNG] [--split test]

Data root: $CAPSBENCH_DATA, else <project>/data; a dataset lives in <root>/<name>.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from harness.data import DataError, dataset_folder, get_spec, list_datasets, mnist, smallnorb, synthnorb
from harness.errors import cli_errors


def _cmd_list(args) -> int:
    for name in list_datasets():
        spec = get_spec(name)
        print(f"{name:14s} {dataset_folder(name)}  {spec.doc}")
    return 0


def _cmd_download(args) -> int:
    folder = dataset_folder(args.name, args.root)
    if args.name == "smallnorb":
        smallnorb.download(folder, force=args.force, progress=not args.quiet)
    elif args.name in ("fashion_mnist", "mnist"):
        mnist.fetch(args.name, folder)
    else:
        raise DataError(
            f"{args.name} cannot be downloaded; make synthnorb with `python -m harness.data synth`"
        )
    print(f"{args.name} ready in {folder}")
    return 0


def _cmd_verify(args) -> int:
    folder = dataset_folder(args.name, args.root)
    if args.name == "smallnorb":
        status = smallnorb.verify(folder)
    else:
        status = synthnorb.verify(folder)
    for name, s in status.items():
        print(f"{s if s == 'ok' else 'BAD':>4}  {name}" + ("" if s == "ok" else f": {s}"))
    bad = [n for n, s in status.items() if s != "ok"]
    if args.name == "smallnorb":
        fix = f"python -m harness.data download smallnorb --root {shlex.quote(str(folder))} --force"
    else:
        fix = synthnorb.synth_command(folder, (synthnorb.read_manifest(folder) or {}).get("options"))
    print(
        f"{args.name} in {folder}: "
        + ("all files ok" if not bad else f"{len(bad)} problem(s); fix with `{fix}`")
    )
    return 1 if bad else 0


def _cmd_synth(args) -> int:
    folder = dataset_folder("synthnorb", args.root)
    t0 = time.perf_counter()
    synthnorb.synthesize(
        folder,
        seed=args.seed,
        image_size=args.image_size,
        lightings=args.lightings,
        elevations=args.elevations,
        instances=args.instances,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(f"synthnorb written to {folder} in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_preview(args) -> int:
    from harness.data.preview import preview  # matplotlib only when needed

    out = preview(
        args.name,
        root=args.root,
        out=args.out,
        split=args.split,
        instance=args.instance,
        elevation=args.elevation,
        lighting=args.lighting,
        progress=not args.quiet,
    )
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.data",
        description=__doc__.split("\n")[0],
        epilog="examples:\n" + __doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help, fn):
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(fn=fn)
        return s

    def root_opt(s):
        s.add_argument(
            "--root", default=None, help="data root or the dataset's folder (default: $CAPSBENCH_DATA/<name>)"
        )
        s.add_argument("--quiet", action="store_true", help="no progress bars")

    add("list", "list the registered datasets and their folders", _cmd_list)
    s = add("download", "download a dataset (smallnorb: resumable, sha256-checked)", _cmd_download)
    s.add_argument("name", choices=["smallnorb", "fashion_mnist", "mnist"])
    s.add_argument(
        "--force", action="store_true", help="download again even if the files are present and correct"
    )
    root_opt(s)
    s = add("verify", "re-hash every file and check it against its checksum", _cmd_verify)
    s.add_argument("name", nargs="?", default="smallnorb", choices=["smallnorb", "synthnorb"])
    root_opt(s)
    s = add("synth", "render synthnorb in smallNORB's format (full set: a few minutes)", _cmd_synth)
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    s.add_argument(
        "--image-size", type=int, default=96, help="side of the rendered images (default 96, min 32)"
    )
    s.add_argument("--lightings", type=int, default=6, help="lighting conditions to keep, 1..6 (default 6)")
    s.add_argument(
        "--elevations", type=int, default=9, help="elevations to keep, spread over 30..70°, 1..9 (default 9)"
    )
    s.add_argument("--instances", type=int, default=5, help="instances per split, 1..5 (default 5)")
    s.add_argument(
        "--workers", type=int, default=None, help="render processes (default: up to 4 for big sets)"
    )
    root_opt(s)
    s = add("preview", "write a PNG grid (categories × azimuths, both cameras)", _cmd_preview)
    s.add_argument("name", choices=["smallnorb", "synthnorb"])
    s.add_argument("--out", default=None, help="PNG path (default: <dataset folder>/preview-<split>.png)")
    s.add_argument("--split", default="test", choices=["train", "test"])
    s.add_argument(
        "--instance", type=int, default=None, help="instance code (default: the first in the split)"
    )
    s.add_argument(
        "--elevation", type=int, default=None, help="elevation code 0..8 (default: the lowest present)"
    )
    s.add_argument(
        "--lighting", type=int, default=None, help="lighting code 0..5 (default: the lowest present)"
    )
    root_opt(s)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # a setting the generator or format refuses
        raise DataError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
