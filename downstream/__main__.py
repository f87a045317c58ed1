"""`python -m downstream VERB ...`: use a trained backbone. A thin face over functions the tests call directly.

  probe CHECKPOINT TRAIN TEST [--protocol dino|mae] [--head linear|cosine|centre]
                                               linear probe (or a head) on frozen features -> JSON + confusion PNG
  knn CHECKPOINT TRAIN TEST [-k 20 -T 0.07]          DINO's weighted k-NN on frozen features
  label-efficiency CHECKPOINT TRAIN TEST [--shots 1,5,10,25,100] [--seeds 5] --out DIR
                                               linear probe and k-NN from k labels per class -> JSON + PNG
  finetune CHECKPOINT TRAIN VAL --out RUN [--recipe R] [--head linear|cosine|centre] [--metric-loss triplet|centre]
                                  [key=value ...]  supervised fine-tune, then top-1 on VAL
  zeroshot CLIP_RUN SHARDS [--retrieval CAPTION_SHARDS]  zero-shot top-1 from class names x templates
  attention CHECKPOINT SHARDS --out X.png      last block's CLS-to-patch attention per head, overlaid
  index build CHECKPOINT SHARDS --out DIR     embed a shard set, save a FAISS index + SQLite metadata
  index add DIR SHARDS                       embed more shards with the index's own backbone and append
  index info DIR                             what an index holds
  index eval DIR [QUERY_SHARDS] [--relevant label|key|field:NAME]
                                             recall@1/5/10 and mAP; relevant = same label, same key or equal
                                             metadata field (field:source_stem: the same source file); without
                                             QUERY_SHARDS the index queries itself, each member leaving itself out
  query DIR (--image FILE|FOLDER|@LIST... | --shards SET... | --key KEY... | --text T...) [--jsonl OUT|-] [--quiet]
                                             top-k neighbours as a table / JSON lines, plus a contact-sheet PNG
  serve DIR [DIR ...] [--host 127.0.0.1] [--port 8000]
                                             the index(es) as an HTTP service with a search page (FastAPI)

Exit status: 0 done, 1 bad input (a clear message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from downstream.features import FeatureError
from downstream.retrieval import RetrievalError
from pretrain.checkpoint import CheckpointError
from shards.ownership import OutputExistsError

# FinetuneError, RecipeError and the rest are ValueErrors.
USER_ERRORS = (FileNotFoundError, OutputExistsError, FeatureError, RetrievalError, CheckpointError, ValueError, KeyError)


def _common_embed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="reuse features embedded before with the same checkpoint")
    p.add_argument("--no-thumbnails", action="store_true", help="store no thumbnails in the metadata database")


def _probe(a: argparse.Namespace) -> int:
    from downstream.probe import probe_checkpoint, resolve_protocol

    kwargs = {"k": a.k, "temperature": a.temperature} if a.verb == "knn" else {}
    protocol = "knn" if a.verb == "knn" else resolve_protocol(a.protocol, a.head)
    if a.verb == "probe" and protocol != "centre":
        if a.epochs:  # an explicit epoch count is taken as is, unless --min-steps asks for a floor too
            kwargs.update(epochs=a.epochs, min_steps=0)
        if a.min_steps is not None:
            kwargs["min_steps"] = a.min_steps
    result = probe_checkpoint(a.checkpoint, a.train, a.test, protocol=protocol, pooling=a.pooling,
                              cache_dir=a.cache_dir, out_dir=a.out, batch_size=a.batch_size,
                              num_workers=a.num_workers, **kwargs)
    top5 = f"  top-5 {result.top5:.4f}" if result.top5 is not None else ""
    print(f"{result.protocol}: top-1 {result.top1:.4f}{top5}  ({result.num_train} train, {result.num_test} test; "
          f"{result.selection})")
    if a.out:
        print(f"wrote {a.out}/{result.protocol}.json and {a.out}/{result.protocol}_confusion.png")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _label_efficiency(a: argparse.Namespace) -> int:
    from downstream.label_efficiency import label_efficiency_checkpoint

    methods = [m for m in a.methods.split(",") if m]
    result = label_efficiency_checkpoint(
        a.checkpoint, a.train, a.test, pooling=a.pooling, cache_dir=a.cache_dir, out_dir=a.out,
        batch_size=a.batch_size, num_workers=a.num_workers, shots=a.shots, seeds=a.seeds, methods=methods,
        protocol=a.protocol, knn_k=a.k, temperature=a.temperature, log=lambda m: print(m, flush=True),
    )
    print(result.table())
    print(f"wrote {a.out}/label_efficiency.json and {a.out}/label_efficiency.png")
    return 0


def _finetune(a: argparse.Namespace) -> int:
    from downstream.finetune import finetune

    # --head / --metric-loss are the recipe keys under a shorter name; explicit overrides come after and win
    flags = [f"objective.supervised.{key}={value}" for key, value in (("head", a.head), ("metric_loss", a.metric_loss))
             if value is not None]
    result = finetune(a.checkpoint, a.train, a.val, out_dir=a.out, recipe=a.recipe, overrides=flags + a.overrides,
                      img_size=a.img_size)
    top5 = f"  top-5 {result.top5:.4f}" if result.top5 is not None else ""
    print(f"finetune: top-1 {result.top1:.4f}{top5}  ({result.num_train} train, {result.num_test} val) -> {a.out}")
    return 0


def _zeroshot(a: argparse.Namespace) -> int:
    from downstream.search import write_json
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

    print(f"attention maps: {attention_maps(a.checkpoint, a.shards, a.out, n_images=a.images, device=a.device)}")
    return 0


def _index_build(a: argparse.Namespace) -> int:
    from downstream.search import build_index, index_summary

    build_index(a.checkpoint, a.shards, a.out, pooling=a.pooling, factory=a.factory, exact_below=a.exact_below,
                batch_size=a.batch_size, num_workers=a.num_workers, cache_dir=a.cache_dir,
                thumbnails=not a.no_thumbnails, space=a.space, overwrite=a.overwrite)
    info = index_summary(a.out)
    print(f"indexed {info['count']} samples ({info['dim']}-d, {info['factory']}, pooling {info['pooling']}) -> {a.out}")
    return 0


def _index_add(a: argparse.Namespace) -> int:
    from downstream.retrieval import RetrievalIndex
    from downstream.search import add_to_index

    before = len(RetrievalIndex.load(a.index))
    index = add_to_index(a.index, a.shards, checkpoint=a.checkpoint, batch_size=a.batch_size,
                         num_workers=a.num_workers, cache_dir=a.cache_dir, thumbnails=not a.no_thumbnails)
    print(f"added {len(index) - before} samples to {a.index}: {len(index)} in all")
    return 0


def _index_info(a: argparse.Namespace) -> int:
    from downstream.search import index_summary

    print(json.dumps(index_summary(a.index), indent=2))
    return 0


def _index_eval(a: argparse.Namespace) -> int:
    from downstream.search import evaluate_index, write_json

    if a.queries and a.queries_option:
        raise ValueError(f"two query shard sets: {a.queries} and --queries {a.queries_option}; give one")
    result = evaluate_index(a.index, a.queries or a.queries_option, relevant=a.relevant, ks=a.ks,
                            checkpoint=a.checkpoint, batch_size=a.batch_size, cache_dir=a.cache_dir)
    print(json.dumps(result, indent=2))
    if a.json:
        write_json(a.json, result)
    return 0


def _query(a: argparse.Namespace) -> int:
    from downstream.search import query_block, query_index, write_json
    from shards.atomic import atomic_path

    to_stdout = a.jsonl == "-"  # stdout carries the JSON lines alone; the rest goes to stderr
    say = (lambda m: print(m, file=sys.stderr)) if to_stdout else print
    show_table = not a.quiet and not to_stdout
    with contextlib.ExitStack() as stack:
        lines = None
        if to_stdout:
            lines = sys.stdout
        elif a.jsonl:
            tmp = stack.enter_context(atomic_path(a.jsonl))
            lines = stack.enter_context(open(tmp, "w", encoding="utf-8"))

        def on_result(record: dict) -> None:
            if lines is not None:
                lines.write(json.dumps(record, ensure_ascii=False) + "\n")
            if show_table:
                print(query_block(record))

        result = query_index(a.index, images=a.image or (), shards=a.shards or (), keys=a.key or (),
                             texts=a.text or (), k=a.k, checkpoint=a.checkpoint, sheet=a.sheet,
                             sheet_rows=a.sheet_rows, batch_size=a.batch_size, cache_dir=a.cache_dir,
                             on_result=on_result, keep=bool(a.json))
    if a.json:
        write_json(a.json, result.to_dict())
    if result.skipped:
        print(f"skipped {len(result.skipped)} input(s) that could not be read; first: "
              f"{result.skipped[0]['input']}: {result.skipped[0]['reason']}", file=sys.stderr)
    if a.quiet or to_stdout or result.count > 1:
        say(f"{result.count} queries answered")
    for what, path in (("contact sheet", result.sheet), ("json", a.json), ("jsonl", None if to_stdout else a.jsonl)):
        if path:
            say(f"{what}: {path}")
    return 0


def _serve(a: argparse.Namespace) -> int:
    from downstream.serve_app import serve

    serve(a.index, host=a.host, port=a.port, checkpoint=a.checkpoint, max_upload_bytes=a.max_upload_mb * 2**20,
          max_pixels=a.max_pixels, max_k=a.max_k, poll_s=a.poll, access_log=not a.no_access_log)
    return 0


def _add_probe_verbs(verbs) -> None:
    """probe and knn: a classifier on frozen features"""
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
                           help="dino: standardised features, SGD; mae: BatchNorm + LARS; both choose lr and "
                                "weight decay on held-out train")
            p.add_argument("--head", choices=("linear", "cosine", "centre"), default="linear",
                           help="linear: the protocol's probe; cosine: a cosine classifier trained the DINO way; "
                                "centre: nearest class mean by cosine (no training)")
            p.add_argument("--epochs", type=int, default=0,
                           help="default: the protocol's own, raised to --min-steps optimizer steps on small sets")
            p.add_argument("--min-steps", type=int, default=None,
                           help="floor on optimizer steps (default 3000; 0 with an explicit --epochs)")
        else:
            p.add_argument("-k", type=int, default=20)
            p.add_argument("-T", "--temperature", type=float, default=0.07)
        p.set_defaults(run=_probe)


def _add_label_efficiency(verbs) -> None:
    """label-efficiency: probe and k-NN from a few labels per class"""
    le = verbs.add_parser("label-efficiency", help="linear probe and k-NN from 1, 5, 10, ... labels per class")
    le.add_argument("checkpoint", help="run folder, checkpoint folder or exported backbone")
    le.add_argument("train", help="labelled shard set the k-shot subsets are drawn from")
    le.add_argument("test", help="labelled shard set every subset's classifier is scored on")
    le.add_argument("--out", required=True, help="folder for label_efficiency.json and label_efficiency.png")
    le.add_argument("--shots", type=_int_list, default=[1, 5, 10, 25, 100], help="labels per class, e.g. 1,5,10")
    le.add_argument("--seeds", type=int, default=5, help="subsets drawn per number of labels (mean ± std)")
    le.add_argument("--methods", default="linear,knn", help="comma-separated: linear, knn, cosine, centre")
    le.add_argument("--protocol", choices=("dino", "mae"), default="dino", help="the linear probe's protocol")
    le.add_argument("-k", type=int, default=20, help="k-NN neighbours (clipped to the subset)")
    le.add_argument("-T", "--temperature", type=float, default=0.07)
    le.add_argument("--pooling", default="cls", help="cls, mean or lastN")
    le.add_argument("--batch-size", type=int, default=256)
    le.add_argument("--num-workers", type=int, default=0)
    le.add_argument("--cache-dir", default=None, help="cache features here (keyed by checkpoint and data)")
    le.set_defaults(run=_label_efficiency)


def _add_finetune(verbs) -> None:
    """finetune: the supervised objective from a pretrained backbone"""
    f = verbs.add_parser("finetune", help="fine-tune a pretrained backbone with labels (the same trainer)")
    f.add_argument("checkpoint", help="pretrained run folder, checkpoint folder or exported backbone")
    f.add_argument("train")
    f.add_argument("val")
    f.add_argument("--out", required=True, help="run folder (resumes when it holds a checkpoint)")
    f.add_argument("--recipe", default=None, help="e.g. recipes/finetune_vit_tiny_fmnist.yaml")
    f.add_argument("--img-size", type=int, default=None, help="fine-tune at another resolution (pos-embed resampled)")
    f.add_argument("--head", choices=("linear", "cosine", "centre"), default=None,
                   help="objective.supervised.head: linear, cosine classifier, or EMA class centres (default: the recipe's)")
    f.add_argument("--metric-loss", choices=("none", "triplet", "centre"), default=None,
                   help="objective.supervised.metric_loss: a batch-hard triplet or centre loss beside the cross-entropy")
    f.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. run.epochs=5")
    f.set_defaults(run=_finetune)


def _add_zeroshot_and_attention(verbs) -> None:
    """zeroshot (CLIP) and attention maps"""
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
    at.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    at.set_defaults(run=_attention)


def _add_index(verbs) -> None:
    """index build | add | info | eval"""
    index = verbs.add_parser("index", help="build, extend or inspect a retrieval index")
    actions = index.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="embed a shard set and save an index folder")
    b.add_argument("checkpoint", help="run folder, checkpoint folder or exported backbone")
    b.add_argument("shards", help="shard-set folder (or glob / brace pattern / URL list)")
    b.add_argument("--out", required=True, help="index folder to write (a new or empty folder, or an earlier "
                   "index with --overwrite; built under a temporary name and renamed)")
    b.add_argument("--overwrite", action="store_true", help="replace an index built earlier at --out")
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
    ev = actions.add_parser("eval", help="recall@k and mAP: class-level (same label) or instance-level")
    ev.add_argument("index")
    ev.add_argument("queries", nargs="?", default=None,
                    help="shard set whose samples query the index (embedded with its checkpoint); default: the "
                         "index queries itself, each member leaving itself out")
    ev.add_argument("--queries", dest="queries_option", default=None, metavar="SHARDS",
                    help="the same as the positional QUERIES")
    ev.add_argument("--relevant", default="label",
                    help="what makes an indexed item relevant to a query: label (same class), key (same sample "
                         "key) or field:NAME, an equal metadata field: field:source_stem (the same source file "
                         "name, e.g. one item in another style or view), field:source, or any field of the "
                         "samples' .json")
    ev.add_argument("--ks", type=_int_list, default=[1, 5, 10], help="recall@k for these k; mAP@max(k)")
    ev.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in the index")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--json", default=None)
    ev.set_defaults(run=_index_eval)


def _add_query(verbs) -> None:
    """query: nearest neighbours of images, samples, keys or texts"""
    q = verbs.add_parser("query", help="nearest neighbours of images, shard samples, indexed keys or texts")
    q.add_argument("index")
    q.add_argument("--image", nargs="+",
                   help="query image file(s), folder(s) of images (recursive) and @LIST files (an image path a "
                        "line, relative to the list's folder); a folder with a manifest.json is a shard set")
    q.add_argument("--shards", nargs="+", help="shard set(s) whose samples query the index (folder, glob, brace "
                                                "pattern or URL list)")
    q.add_argument("--key", nargs="+", help="key(s) of indexed samples (they never find themselves)")
    q.add_argument("--text", nargs="+", help="text(s), for an index built with --space clip")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in the index")
    q.add_argument("--sheet", default=None, help="write a contact-sheet PNG here")
    q.add_argument("--sheet-rows", type=int, default=20, help="queries drawn on the contact sheet (the first ones)")
    q.add_argument("--jsonl", default=None, metavar="OUT",
                   help="write one JSON line per query here as it is answered ('-': to stdout, instead of the table)")
    q.add_argument("--json", default=None, help="write all results as one JSON document here")
    q.add_argument("--quiet", action="store_true", help="print no table")
    q.add_argument("--batch-size", type=int, default=256, help="queries embedded and searched together")
    q.add_argument("--cache-dir", default=None, help="reuse features of query shard sets embedded before")
    q.set_defaults(run=_query)


def _add_serve(verbs) -> None:
    """serve: the index over HTTP"""
    sv = verbs.add_parser("serve", help="serve index folders over HTTP: a search API and a page (FastAPI)")
    sv.add_argument("index", nargs="+", help="index folder(s); a request picks one by folder name (?index=NAME)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--checkpoint", default=None, help="default: the checkpoint recorded in each index")
    sv.add_argument("--max-upload-mb", type=int, default=10, help="largest request body, in MiB")
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest uploaded image, in pixels")
    sv.add_argument("--max-k", type=int, default=100, help="most hits one search may ask for")
    sv.add_argument("--poll", type=float, default=1.0,
                    help="seconds between checks of the folders for a new version (`index add`); 0: only on "
                         "POST /reload")
    sv.add_argument("--no-access-log", action="store_true", help="no log line per request")
    sv.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m downstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    _add_probe_verbs(verbs)
    _add_label_efficiency(verbs)
    _add_finetune(verbs)
    _add_zeroshot_and_attention(verbs)
    _add_index(verbs)
    _add_query(verbs)
    _add_serve(verbs)
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
