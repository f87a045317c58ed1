"""`python -m downstream VERB ...`: use a trained backbone. A thin face over functions the tests call directly.

  probe CHECKPOINT TRAIN TEST [--protocol dino|mae]  linear probe on frozen features -> JSON + confusion PNG
  knn CHECKPOINT TRAIN TEST [-k 20 -T 0.07]          DINO's weighted k-NN on frozen features
  finetune CHECKPOINT TRAIN VAL --out RUN [--recipe R] [key=value ...]  supervised fine-tune, then top-1 on VAL
  zeroshot CLIP_RUN SHARDS [--retrieval CAPTION_SHARDS]  zero-shot top-1 from class names x templates
  attention CHECKPOINT SHARDS --out X.png      last block's CLS-to-patch attention per head, overlaid
  index build CHECKPOINT SHARDS --out DIR     embed a shard set, save a FAISS index + SQLite metadata
  index add DIR SHARDS                       embed more shards with the index's own backbone and append
  index info DIR                             what an index holds
  index eval DIR QUERY_SHARDS                recall@1/5/10 and mAP of labelled queries (same label = relevant)
  query DIR (--image FILE... | --key KEY... | --text T...) top-k neighbours as a table / JSON, plus a contact-sheet PNG

Exit status: 0 done, 1 bad input (a clear message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from downstream.features import FeatureError
from downstream.retrieval import RetrievalError
from pretrain.checkpoint import CheckpointError

# FinetuneError, RecipeError and the rest are ValueErrors.
USER_ERRORS = (FileNotFoundError, FeatureError, RetrievalError, CheckpointError, ValueError, KeyError)


def _common_embed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="reuse features embedded before with the same checkpoint")
    p.add_argument("--no-thumbnails", action="store_true", help="store no thumbnails in the metadata database")


def _probe(a: argparse.Namespace) -> int:
    from downstream.probe import probe_checkpoint

    kwargs = {"k": a.k, "temperature": a.temperature} if a.verb == "knn" else {}
    if a.verb == "probe" and a.epochs:
        kwargs["epochs"] = a.epochs
    protocol = "knn" if a.verb == "knn" else a.protocol
    result = probe_checkpoint(a.checkpoint, a.train, a.test, protocol=protocol, pooling=a.pooling,
                              cache_dir=a.cache_dir, out_dir=a.out, batch_size=a.batch_size,
                              num_workers=a.num_workers, **kwargs)
    top5 = f"  top-5 {result.top5:.4f}" if result.top5 is not None else ""
    print(f"{protocol}: top-1 {result.top1:.4f}{top5}  ({result.num_train} train, {result.num_test} test; "
          f"{result.selection})")
    if a.out:
        print(f"wrote {a.out}/{protocol}.json and {a.out}/{protocol}_confusion.png")
    return 0


def _finetune(a: argparse.Namespace) -> int:
    from downstream.finetune import finetune

    result = finetune(a.checkpoint, a.train, a.val, out_dir=a.out, recipe=a.recipe, overrides=a.overrides,
                      img_size=a.img_size)
    top5 = f"  top-5 {result.top5:.4f}" if result.top5 is not None else ""
    print(f"finetune: top-1 {result.top1:.4f}{top5}  ({result.num_train} train, {result.num_test} val) -> {a.out}")
    return 0


def _zeroshot(a: argparse.Namespace) -> int:
    from downstream.shard_index import write_json
    from downstream.zeroshot import zeroshot

    result = zeroshot(a.checkpoint, a.shards, a.template or None, retrieval_shards=a.retrieval,
                      batch_size=a.batch_size, cache_dir=a.cache_dir)
    if result.top1 is not None:
        print(f"zero-shot: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  ({result.num_samples} images, "
              f"{len(result.classes)} classes x {len(result.templates)} templates)")
    if result.retrieval is not None:
        print(f"image<->text retrieval: {json.dumps(result.to_dict()['retrieval'])}")
    if a.json:
        write_json(a.json, result.to_dict())
        print(f"json: {a.json}")
    return 0


def _attention(a: argparse.Namespace) -> int:
    from downstream.attention import attention_maps

    print(f"attention maps: {attention_maps(a.checkpoint, a.shards, a.out, n_images=a.images)}")
    return 0


def _index_build(a: argparse.Namespace) -> int:
    from downstream.shard_index import build_index, index_summary

    build_index(a.checkpoint, a.shards, a.out, pooling=a.pooling, factory=a.factory, exact_below=a.exact_below,
                batch_size=a.batch_size, num_workers=a.num_workers, cache_dir=a.cache_dir,
                thumbnails=not a.no_thumbnails, space=a.space)
    info = index_summary(a.out)
    print(f"indexed {info['count']} samples ({info['dim']}-d, {info['factory']}, pooling {info['pooling']}) -> {a.out}")
    return 0


def _index_add(a: argparse.Namespace) -> int:
    from downstream.retrieval import RetrievalIndex
    from downstream.shard_index import add_to_index

    before = len(RetrievalIndex.load(a.index))
    index = add_to_index(a.index, a.shards, checkpoint=a.checkpoint, batch_size=a.batch_size,
                         num_workers=a.num_workers, cache_dir=a.cache_dir, thumbnails=not a.no_thumbnails)
    print(f"added {len(index) - before} samples to {a.index}: {len(index)} in all")
    return 0


def _index_info(a: argparse.Namespace) -> int:
    from downstream.shard_index import index_summary

    print(json.dumps(index_summary(a.index), indent=2))
    return 0


def _index_eval(a: argparse.Namespace) -> int:
    from downstream.shard_index import evaluate_index, write_json

    result = evaluate_index(a.index, a.queries, checkpoint=a.checkpoint, batch_size=a.batch_size,
                            cache_dir=a.cache_dir)
    print(json.dumps(result, indent=2))
    if a.json:
        write_json(a.json, result)
    return 0


def _query(a: argparse.Namespace) -> int:
    from downstream.shard_index import query_index, write_json

    result = query_index(a.index, images=a.image or (), keys=a.key or (), texts=a.text or (), k=a.k,
                         checkpoint=a.checkpoint,
                         sheet=a.sheet)
    if a.json:
        write_json(a.json, result.to_dict())
    print(result.table())
    for what, path in (("contact sheet", result.sheet), ("json", a.json)):
        if path:
            print(f"{what}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m downstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    for verb, text in (("probe", "linear probe on frozen features"), ("knn", "k-NN on frozen features")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("checkpoint", help="run folder, checkpoint folder or exported backbone")
        p.add_argument("train", help="labelled shard set the classifier learns from")
        p.add_argument("test", help="labelled shard set it is scored on")
        p.add_argument("--pooling", default="cls", help="cls, mean or lastN (DINO's probe input: last4)")
        p.add_argument("--out", default=None, help="folder for the JSON result and the confusion-matrix PNG")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--num-workers", type=int, default=0)
        p.add_argument("--cache-dir", default=None, help="cache features here (keyed by checkpoint and data)")
        if verb == "probe":
            p.add_argument("--protocol", choices=("dino", "mae"), default="dino",
                           help="dino: SGD, lr swept on held-out train; mae: BatchNorm + LARS")
            p.add_argument("--epochs", type=int, default=0, help="default: the protocol's own")
        else:
            p.add_argument("-k", type=int, default=20)
            p.add_argument("-T", "--temperature", type=float, default=0.07)
        p.set_defaults(run=_probe)

    f = verbs.add_parser("finetune", help="fine-tune a pretrained backbone with labels (the same trainer)")
    f.add_argument("checkpoint", help="pretrained run folder, checkpoint folder or exported backbone")
    f.add_argument("train")
    f.add_argument("val")
    f.add_argument("--out", required=True, help="run folder (resumes when it holds a checkpoint)")
    f.add_argument("--recipe", default=None, help="e.g. recipes/finetune_vit_tiny_fmnist.yaml")
    f.add_argument("--img-size", type=int, default=None, help="fine-tune at another resolution (pos-embed resampled)")
    f.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. run.epochs=5")
    f.set_defaults(run=_finetune)

    z = verbs.add_parser("zeroshot", help="CLIP: zero-shot classification and image-text retrieval")
    z.add_argument("checkpoint", help="CLIP run folder, its open_clip export or a checkpoint")
    z.add_argument("shards", nargs="?", default=None, help="labelled shard set to classify")
    z.add_argument("--template", action="append", help="caption template with one {} (repeat; default a list)")
    z.add_argument("--retrieval", default=None, help="caption shard set for image<->text recall@1/5/10")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--cache-dir", default=None)
    z.add_argument("--json", default=None, help="write the result as JSON here")
    z.set_defaults(run=_zeroshot)

    at = verbs.add_parser("attention", help="attention-map PNG of any backbone")
    at.add_argument("checkpoint", help="run folder, checkpoint folder or exported backbone")
    at.add_argument("shards", help="shard set to take the first images from")
    at.add_argument("--out", required=True, help="PNG to write")
    at.add_argument("--images", type=int, default=8)
    at.set_defaults(run=_attention)

    index = verbs.add_parser("index", help="build, extend or inspect a retrieval index")
    actions = index.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="embed a shard set and save an index folder")
    b.add_argument("checkpoint", help="run folder, checkpoint folder or exported backbone")
    b.add_argument("shards", help="shard-set folder (or glob / brace pattern / URL list)")
    b.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    b.add_argument("--pooling", default="cls", help="cls, mean or lastN")
    b.add_argument("--factory", default=None, help="any FAISS factory string, e.g. IVF256,Flat or HNSW32")
    b.add_argument("--exact-below", type=int, default=100_000, help="exact search below this many vectors")
    b.add_argument("--space", choices=("backbone", "clip"), default="backbone",
                   help="clip: a CLIP run's joint image-text embeddings, so text queries work")
    _common_embed(b)
    b.set_defaults(run=_index_build)
    ad = actions.add_parser("add", help="embed more shards with the index's backbone and append them")
    ad.add_argument("index")
    ad.add_argument("shards")
    ad.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in the index")
    _common_embed(ad)
    ad.set_defaults(run=_index_add)
    i = actions.add_parser("info", help="print what an index holds")
    i.add_argument("index")
    i.set_defaults(run=_index_info)
    ev = actions.add_parser("eval", help="recall@k and mAP of a labelled query shard set")
    ev.add_argument("index")
    ev.add_argument("queries", help="labelled shard set whose samples query the index")
    ev.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in the index")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--json", default=None)
    ev.set_defaults(run=_index_eval)

    q = verbs.add_parser("query", help="nearest neighbours of images or indexed keys")
    q.add_argument("index")
    q.add_argument("--image", nargs="+", help="query image file(s)")
    q.add_argument("--key", nargs="+", help="key(s) of indexed samples (they never find themselves)")
    q.add_argument("--text", nargs="+", help="text(s), for an index built with --space clip")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in the index")
    q.add_argument("--sheet", default=None, help="write a contact-sheet PNG here")
    q.add_argument("--json", default=None, help="write the results as JSON here")
    q.set_defaults(run=_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positional overrides after options ("... --out ft run.epochs=5"): collect them here
    dotted = [x for x in extra if "=" in x and not x.startswith("-")]
    if extra != dotted or (dotted and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if dotted:
        args.overrides = [*args.overrides, *dotted]
    try:
        return args.run(args)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
