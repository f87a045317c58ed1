"""`python -m shards`: write, verify and describe WebDataset shard sets.

    python -m shards write digits --out data/digits --val-fraction 0.1
    python -m shards write idx /data/fashion-mnist --classes fashion-mnist --out data/fmnist
    python -m shards write folder /data/pets --out data/pets --size 64 --val-fraction 0.1 --workers 4
    python -m shards write captions /data/pairs.tsv --out data/pairs --image-col path --key stem
    python -m shards verify data/fmnist
    python -m shards info data/fmnist/train --grid fmnist.png
    python -m shards stats data/pets/train          # per-channel mean/std, sizes, modes, classes, captions
    python -m shards export data/pets/val --out pets-val --format jpg   # back to OUT/<class>/<key>.jpg

verify, info and stats read local shard-set folders, ours or another tool's (img2dataset: no manifest); stats also
takes tar lists, globs and brace patterns. A `pipe:` argument (a shell command) is refused unless
VITSSL_ALLOW_PIPE=1 is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from shards.atomic import write_text_atomic
from shards.colourise import colourised, first
from shards.export import EXPORT_FORMATS, export_folder
from shards.info import info
from shards.manifest import MANIFEST_NAME, Manifest, load_manifest
from shards.ownership import claim_output, refuse_input_overlap
from shards.resize import FITS, Resize
from shards.sources import (
    KEY_MODES,
    SampleSource,
    TableColumns,
    caption_table_source,
    digits_source,
    idx_source,
    image_folder_source,
    mnist_splits,
    resolve_classes,
)
from shards.stats import STATS_NAME, format_stats, measure_shards
from shards.tar import check_pipe_allowed
from shards.verify import verify
from shards.writer import ENCODINGS, write_shard_set, write_split_shard_sets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description="WebDataset shard sets: write, verify, info.")
    commands = parser.add_subparsers(dest="command", required=True)

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--out", type=Path, required=True, help="output folder of the shard set")
    options.add_argument("--overwrite", action="store_true",
                         help="replace a shard set written earlier at --out (nothing else is ever replaced)")
    options.add_argument("--samples-per-shard", type=int, default=1000)
    options.add_argument("--max-shard-bytes", type=int, default=0, help="close a shard before it passes this size")
    options.add_argument("--shard-multiple", type=int, default=1,
                         help="equal-sized shards whose count is a multiple of this (e.g. ranks x workers)")
    options.add_argument("--encoding", choices=ENCODINGS, default="png")
    options.add_argument("--jpg-quality", type=int, default=95)
    options.add_argument("--val-fraction", type=float, default=0.0,
                         help="write OUT/train and OUT/val, this fraction of samples going to val")
    options.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of --colourise's styles")
    options.add_argument("--classes", help="fashion-mnist, mnist, or comma-separated class names")
    options.add_argument("--limit", type=int, help="write only the first N samples of each split")
    options.add_argument("--colourise", type=int, metavar="PX",
                         help="write a colour version at PX x PX: per-sample object hue, background colour and "
                              "texture drawn from --seed (shards/colourise.py)")
    sizing = options.add_mutually_exclusive_group()
    sizing.add_argument("--size", type=int, default=0, metavar="S",
                        help="store every image S x S: the shorter side scaled to S and the centre cut (--fit crop), "
                             "or the longer side scaled to S and black bars added (--fit pad)")
    sizing.add_argument("--max-size", type=int, default=0, metavar="M",
                        help="shrink images larger than M x M to fit it (aspect kept); smaller ones stay as they are")
    options.add_argument("--fit", choices=FITS, default="crop", help="how --size makes a non-square image square")
    options.add_argument("--workers", type=int, default=1,
                         help="processes that open, resize and encode images (the shards are the same bytes)")
    keyed = argparse.ArgumentParser(add_help=False)
    keyed.add_argument("--key", choices=KEY_MODES, default="index",
                       help="sample keys: 'index' (00000000, ... in order) or 'stem' (the file name without its "
                            "extension; refused when two files share one)")

    write = commands.add_parser("write", help="write a shard set from a source")
    kinds = write.add_subparsers(dest="kind", required=True)
    kinds.add_parser("digits", parents=[options], help="scikit-learn's built-in 8x8 digits (1,797 images)")
    folder = kinds.add_parser("folder", parents=[options, keyed], help="ROOT/<class>/<image> folders")
    folder.add_argument("root", type=Path)
    idx = kinds.add_parser("idx", parents=[options],
                           help="a folder with the four (Fashion-)MNIST files, or an IDX images file with --labels")
    idx.add_argument("path", type=Path)
    idx.add_argument("--labels", type=Path, help="IDX labels file (when PATH is an images file)")
    captions = kinds.add_parser("captions", parents=[options, keyed],
                                help="a .csv/.tsv/.jsonl/.parquet table: image, caption[, label][, id]")
    captions.add_argument("table", type=Path)
    defaults = TableColumns()
    captions.add_argument("--image-col", default=defaults.image, help="column with the image path (relative to the "
                          "table's folder, or absolute)")
    captions.add_argument("--caption-col", default=defaults.caption, help="column with the caption ('' for none)")
    captions.add_argument("--label-col", default=defaults.label, help="column with the class name or index "
                          "(optional)")
    captions.add_argument("--id-col", default=defaults.id, help="column with the item id (optional; the source name)")

    check = commands.add_parser("verify", help="re-hash shards, decode every sample; exit 1 on any problem")
    check.add_argument("folder", type=Path)
    describe = commands.add_parser("info", help="counts per shard and class; optional sample-grid PNG")
    describe.add_argument("folder", type=Path)
    describe.add_argument("--grid", type=Path, help="write a sample-grid PNG here")
    describe.add_argument("--per-class", type=int, default=8, help="images per class in the grid")
    measure = commands.add_parser("stats", help="per-channel mean/std, sizes, modes, classes, captions, measured "
                                  "from the tars")
    measure.add_argument("folder", help="a shard-set folder, tar paths, a glob or a brace pattern")
    measure.add_argument("--limit", type=int, default=0, help="measure about this many samples, spread over "
                         "the shards (0: all)")
    measure.add_argument("--save", action="store_true", help=f"keep the result: in our manifest, or as {STATS_NAME} "
                         "beside another tool's tars (recipes' `auto` reads either)")
    unpack = commands.add_parser("export", help="write a shard set out as an image folder OUT/<class>/<key>.<ext>")
    unpack.add_argument("folder", help="a shard-set folder, tar paths, a glob or a brace pattern")
    unpack.add_argument("--out", type=Path, required=True, help="the folder to create")
    unpack.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="png")
    unpack.add_argument("--jpg-quality", type=int, default=95)
    unpack.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    return parser


def _sources(args: argparse.Namespace) -> dict[str, SampleSource]:
    """Split name ("" for a single set) -> source, as the `write` arguments ask."""
    classes = resolve_classes(args.classes) if args.classes else None
    if args.kind == "digits":
        if classes is not None:
            raise ValueError("the digits set has fixed classes; drop --classes")
        return {"": digits_source()}
    if args.kind == "folder":
        return {"": image_folder_source(args.root, classes, key=args.key)}
    if args.kind == "captions":
        columns = TableColumns(args.image_col, args.caption_col, args.label_col, args.id_col)
        return {"": caption_table_source(args.table, classes, key=args.key, columns=columns)}
    if args.path.is_dir():
        if args.val_fraction:
            raise ValueError(f"{args.path} holds its own train and test (val) files; drop --val-fraction")
        return mnist_splits(args.path, classes)
    if not args.path.is_file():
        raise FileNotFoundError(f"IDX path {args.path} does not exist: give a folder with train-images-idx3-ubyte"
                                "[.gz] and the other three files, or an images file with --labels")
    if args.labels is None:
        raise ValueError(f"{args.path} is a single IDX file: give its labels file with --labels")
    return {"": idx_source(args.path, args.labels, classes)}


def _claim_shard_sets(args: argparse.Namespace, splits: Sequence[str]) -> dict[Path, int]:
    """Check every set `write` will put under --out before reading anything; {set: samples} of those replaced."""
    # A folder source is scanned recursively, so the output may not lie inside it; any other input at --out
    # (the table, an IDX folder) is a file or an unmarked folder, which claim_output refuses.
    refuse_input_overlap(args.out, [args.root] if args.kind == "folder" else [])
    replaced = {}
    for split in splits:
        folder = args.out / split if split else args.out
        if claim_output(folder, "shards", overwrite=args.overwrite) == "replace":
            try:
                replaced[folder] = load_manifest(folder).total
            except (OSError, ValueError):
                replaced[folder] = -1
    return replaced


def _write(args: argparse.Namespace) -> int:
    options = {
        "samples_per_shard": args.samples_per_shard,
        "max_shard_bytes": args.max_shard_bytes,
        "encoding": args.encoding,
        "jpg_quality": args.jpg_quality,
        "shard_multiple": args.shard_multiple,
        "resize": Resize(args.size, args.fit, args.max_size),
        "workers": args.workers,
    }
    written: dict[Path, Manifest] = {}
    sources = _sources(args)
    splits = ["train", "val"] if len(sources) == 1 and args.val_fraction else list(sources)
    replaced = _claim_shard_sets(args, splits)
    for split, source in sources.items():
        if args.limit is not None:
            source = first(source, args.limit)
        if args.colourise is not None:
            source = colourised(source, size=args.colourise, seed=args.seed, split=split)
        samples = tqdm(source, total=source.count, desc=f"writing {split or 'shards'}", unit="img", disable=None)
        common = {"classes": source.classes, "source": source.description, "on_skip": source.skip,
                  "overwrite": args.overwrite, **options}
        if split:
            written[args.out / split] = write_shard_set(samples, args.out / split, split=split, **common)
        elif args.val_fraction:
            sets = write_split_shard_sets(samples, args.out, val_fraction=args.val_fraction, seed=args.seed, **common)
            written.update({args.out / name: manifest for name, manifest in sets.items()})
        else:
            written[args.out] = write_shard_set(samples, args.out, **common)
        if source.skipped:
            print(f"skipped {source.skipped} of {source.count} entries of {source.description} (see warnings)")
    for path, m in written.items():
        converted = f"; converted to 8-bit L/RGB: {m.conversions_text()}" if m.conversions else ""
        sized = f", images {m.resize}" if m.resize else ""
        was = replaced.get(path)
        earlier = "" if was is None else f" (replaced the earlier set{'' if was < 0 else f' of {was} samples'})"
        print(f"wrote {path}: {len(m.shards)} shards, {m.total} samples, {len(m.classes)} classes{sized}{converted}"
              f"{earlier}")
        print(format_stats(m.stats))
    return 0


def _shard_sets(folder: Path) -> list[Path]:
    """`folder` itself, or its subfolders that are shard sets (e.g. OUT/train and OUT/val)."""
    if (folder / MANIFEST_NAME).is_file() or any(folder.glob("*.tar")) or not folder.is_dir():
        return [folder]
    subsets = sorted(p.parent for p in folder.glob(f"*/{MANIFEST_NAME}"))
    return subsets or [folder]


def _stats(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit}: must be >= 0")
    if args.save and args.limit:
        raise ValueError("--save keeps statistics of the whole set: drop --limit")
    sources = [str(f) for f in _shard_sets(Path(args.folder))] if Path(args.folder).is_dir() else [args.folder]
    clean = True
    for source in sources:
        folder = Path(source)
        manifest = load_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None
        measured, unreadable = measure_shards(source, args.limit)
        stats = measured.to_dict(manifest.classes if manifest else None)
        print(f"{source}: measured {measured.images} samples" + (f", {unreadable} unreadable" if unreadable else ""))
        print(format_stats(stats))
        clean = clean and not unreadable
        if not args.save:
            continue
        if not folder.is_dir():
            raise ValueError(f"--save needs a shard-set folder (the stats are kept beside its shards), got {source}")
        if manifest is not None:
            manifest.stats = stats
            print(f"saved in {manifest.save(folder)}")
        else:
            write_text_atomic(folder / STATS_NAME, json.dumps(stats, indent=2))
            print(f"saved in {folder / STATS_NAME}")
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "write":
            return _write(args)
        check_pipe_allowed(str(args.folder))  # the message says it runs a shell command and how to allow it
        if args.command == "stats":
            return _stats(args)
        if args.command == "export":
            if Path(args.folder).exists():
                refuse_input_overlap(args.out, [args.folder])
            counts = export_folder(args.folder, args.out, args.format, args.jpg_quality, overwrite=args.overwrite)
            print(f"wrote {sum(n for k, n in counts.items() if not k.startswith('('))} images to {args.out}: "
                  + ", ".join(f"{k} {n}" for k, n in counts.items()))
            return 0 if "(unreadable)" not in counts else 1
        if args.command == "verify":
            reports = [verify(folder) for folder in _shard_sets(args.folder)]
            print("\n".join(r.format() for r in reports))
            return 0 if all(r.ok for r in reports) else 1
        for folder in _shard_sets(args.folder):
            grid = args.grid
            if grid is not None and folder != args.folder:  # one grid per subset, beside the requested path
                grid = grid.with_name(f"{grid.stem}-{folder.name}{grid.suffix}")
            print(info(folder, grid, per_class=args.per_class).format())
        return 0
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
