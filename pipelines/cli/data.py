"""``ebm data ingest`` and ``ebm data inspect``, registered on the ``ebm`` command's subparsers."""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.data.layout import DatasetError
from pipelines.storage import StorageError


def _pairs(items: list[str], flag: str, sep: str) -> dict[str, str | None]:
    out = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, _, value = part.partition(sep)
            if not key:
                raise DatasetError(f"{flag} {part!r}: expected NAME{sep}VALUE")
            out[key] = value or None
    return out


def _numbers(text: str, flag: str, n: int | None = None) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(",", ":").split(":") if v != ""]
    except ValueError:
        raise DatasetError(f"{flag}: {text!r} is not a list of numbers") from None
    if n is not None and len(vals) != n:
        raise DatasetError(f"{flag}: expected {n} numbers, got {text!r}")
    return vals


def target_declarations(args: argparse.Namespace) -> dict:
    """--targets/--circular/--units/--grid/--sigmas -> the ``targets`` argument of ingest."""
    decl: dict = {}
    if args.targets:
        decl["names"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.circular:
        decl["circular"] = {k: (_numbers(v, f"--circular {k}", 1)[0] if v else None)
                            for k, v in _pairs(args.circular, "--circular", ":").items()}
    if args.units:
        decl["units"] = _pairs(args.units, "--units", "=")
    if args.grid:
        decl["grid"] = {k: tuple(_numbers(v or "", f"--grid {k}", 3)) for k, v in _pairs(args.grid, "--grid", "=").items()}
    if args.sigmas:
        decl["sigmas"] = _numbers(args.sigmas, "--sigmas", 2)
    return decl


def _ingest(args: argparse.Namespace) -> int:
    from pipelines.cli import quiet
    from pipelines.data.ingest import describe_targets, ingest
    n = {k: v for k, v in (("train", args.n_train), ("val", args.n_val), ("test", args.n_test)) if v}
    try:        # SIGTERM arrives as KeyboardInterrupt (pipelines.cli.main), and cleans up like Ctrl-C
        meta = ingest(args.format, args.source, args.out, task=args.task, seed=args.seed,
                      shard_rows=args.shard_rows, val_frac=args.val_frac, test_frac=args.test_frac,
                      size=args.size, n=n or None, manifest=args.manifest, targets=target_declarations(args),
                      inputs=[c.strip() for c in args.inputs.split(",") if c.strip()] or None,
                      overwrite=args.overwrite, progress=not (args.quiet or quiet()), dedupe=args.dedupe,
                      allow_outside=args.allow_outside)
    except (DatasetError, StorageError) as e:
        print(f"ebm data ingest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ebm data ingest: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    counts = ", ".join(f"{s} {v['rows']}" for s, v in meta["splits"].items())
    print(f"{args.out}: task {meta['task']}, {counts}; {meta['fingerprint']}")
    print(describe_targets(meta))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipelines.data.inspect import contact_sheet, format_summary, summary
    try:
        s = summary(args.dir, verify=args.verify)
        print(json.dumps(s, indent=1) if args.json else format_summary(s))
        if args.sheet:
            print(f"contact sheet: {contact_sheet(args.dir, args.sheet, split=args.split, n=args.n)}")
    except (DatasetError, StorageError) as e:
        print(f"ebm data inspect: {e}", file=sys.stderr)
        return 2
    return 0


def add_data_commands(subparsers) -> None:
    """Register ``data ingest FORMAT SOURCE --out DIR ...`` and ``data inspect DIR [--sheet PNG]``."""
    from pipelines.data.ingest import FORMATS
    from pipelines.data.layout import DEFAULT_SHARD_ROWS
    data = subparsers.add_parser("data", help="ingest, validate and inspect Parquet datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    ing = sub.add_parser("ingest", help="convert a source dataset into sharded Parquet")
    ing.add_argument("format", choices=FORMATS, help="source format")
    ing.add_argument("source", nargs="?", help="file or folder (synthetic: toy1|toy2|star; fashion_rotation "
                     "defaults to /usr/share/datasets/fashion-mnist/)")
    ing.add_argument("--out", required=True, help="dataset directory to create: a local path or a URI "
                     "(s3://bucket/prefix; credentials and endpoint from the AWS environment)")
    ing.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per Parquet shard")
    ing.add_argument("--seed", type=int, default=0, help="seed of the split (and of generated data)")
    ing.add_argument("--task", help="task name (ccgan_h5: steering|age if the file name does not say; "
                     "folder_csv: a known task or a new name)")
    ing.add_argument("--val-frac", type=float, default=0.1, help="validation fraction when the source has no split")
    ing.add_argument("--test-frac", type=float, default=0.2, help="test fraction when the source has no split")
    ing.add_argument("--manifest", help="folder_csv: the CSV manifest (default: the folder's only .csv)")
    tg = ing.add_argument_group("folder_csv and table: declaring a new task's targets (defaults come from the data)")
    tg.add_argument("--inputs", default="", metavar="COL,...", help="table: the input columns (default: every "
                    "numeric column that is not a target, split or id)")
    tg.add_argument("--targets", default="", metavar="NAME,...", help="the manifest's target columns, in order "
                    "(default: y, or y0..y{D-1}, or every non-file column)")
    tg.add_argument("--circular", action="append", default=[], metavar="NAME[:PERIOD]",
                    help="a circular target (an angle) with its period, e.g. angle:360 for degrees (default 2π: "
                    "radians); stored and predicted in radians on [0, 2π). Repeatable")
    tg.add_argument("--units", action="append", default=[], metavar="NAME=UNIT", help="a target's units (repeatable)")
    tg.add_argument("--grid", action="append", default=[], metavar="NAME=LO:HI:N",
                    help="a linear target's evaluation grid (default: the data's range + 5%%)")
    tg.add_argument("--sigmas", default="", metavar="S1,S2", help="the fixed-proposal baselines' two σ's "
                    "(default: 1%% and 20%% of the widest linear range)")
    ing.add_argument("--size", type=int, help="synthetic star: image side")
    ing.add_argument("--n-train", type=int, default=0, help="synthetic: split sizes (0 = default); fashion_rotation: seeded subset sizes (0 = all)")
    ing.add_argument("--n-val", type=int, default=0)
    ing.add_argument("--n-test", type=int, default=0)
    ing.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    ing.add_argument("--dedupe", action="store_true", help="image folders: keep the first of rows that repeat a "
                     "file, an id or the same image bytes (default: refuse them; they would leak across splits)")
    ing.add_argument("--allow-outside", action="store_true", help="folder_csv: accept manifest paths outside the "
                     "source folder (absolute, or through '..')")
    ing.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ing.set_defaults(func=_ingest)

    ins = sub.add_parser("inspect", help="counts, target statistics, schema, fingerprint, contact sheet")
    ins.add_argument("dir", help="dataset directory")
    ins.add_argument("--sheet", metavar="PNG", help="write a contact sheet of labelled images here")
    ins.add_argument("--split", default="train", choices=("train", "val", "test"), help="split for the sheet")
    ins.add_argument("-n", type=int, default=16, help="images on the sheet")
    ins.add_argument("--verify", action="store_true", help="recompute the content fingerprint")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(func=_inspect)
