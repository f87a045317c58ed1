"""Instance-level retrieval: source names from the writers into the index, `index eval --relevant` checked against
brute force, and batch queries (folders, @lists, shard sets) as JSON lines. Real shards, FAISS and SQLite.

The data: 12 items of 3 classes as 8x8 "photos" (6 with a second, very noisy view in another folder: the same
file stem under another path) and a noisy "sketch" of 10 of them, plus a sketch of an item with no photo. The
noise is chosen so that recall and mAP land strictly between 0 and 1 (a metric stuck at 1 would prove little).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.__main__ import main
from downstream.features import extract_features
from downstream.retrieval import INFO_NAME, META_NAME, RetrievalError, RetrievalIndex
from downstream.search import build_index, evaluate_index, index_summary, query_index
from pretrain.backbone import create_backbone, export_backbone
from pretrain.recipe import ModelConfig
from pretrain.restore import load_backbone_from
from shards.record import encode_sample
from shards.sources import RawSample, image_folder_source, sample_source, source_stem
from shards.writer import write_shard_set

TINY = ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
CLASSES = ["bag", "hat", "shoe"]
KS = (1, 2, 5)


def _pattern(item: int, noise: float, seed: int) -> np.ndarray:
    base = np.random.default_rng(item).integers(0, 256, (8, 8)).astype(np.float64)
    jitter = np.random.default_rng(seed).normal(0, noise, (8, 8))
    return np.clip(base + jitter, 0, 255).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Image folders, their shard sets, a backbone and an index of the photos (built once for the module)."""
    root = tmp_path_factory.mktemp("instances")
    for item in range(12):
        cls = CLASSES[item % 3]
        _save(root / "photo" / cls / f"item_{item:02d}.png", _pattern(item, 0, 0))
        if item < 6:  # a second view: same stem, another path (source)
            _save(root / "photo" / cls / "views" / f"item_{item:02d}.png", _pattern(item, 160, 100 + item))
        if item < 10:
            _save(root / "sketch" / cls / f"item_{item:02d}.png", _pattern(item, 90, 200 + item))
    _save(root / "sketch" / "bag" / "item_99.png", _pattern(99, 0, 0))  # no photo of it: no relevant item
    for name in ("photo", "sketch"):
        source = image_folder_source(root / name)
        write_shard_set(source, root / f"{name}_shards", classes=source.classes, source=source.description,
                        samples_per_shard=6)
    torch.manual_seed(0)
    backbone = export_backbone(create_backbone(TINY), root / "backbone", mean=[0.4], std=[0.3])
    build_index(backbone, str(root / "photo_shards"), root / "index")
    return {"root": root, "backbone": backbone, "index": root / "index", "photos": root / "photo_shards",
            "sketches": root / "sketch_shards"}


def tar_paths(shards: Path) -> dict[str, str]:
    """key -> the "path" in each sample's .json, read with the standard library's tarfile (not our reader)."""
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(t.extractfile(m).read())["path"]
    return out


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def brute_force(q: torch.Tensor, db: torch.Tensor, q_vals: list, db_vals: list, ks, exclude_self: bool = False):
    """Exact cosine top-k in float64 and recall@k / mAP@max(k) by plain loops (relevant = equal, non-None value)."""
    sims = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(db.double(), dim=1).T
    if exclude_self:
        sims.fill_diagonal_(-float("inf"))
    top = sims.topk(max(ks), dim=1).indices.tolist()
    recalls, aps, skipped = {k: [] for k in ks}, [], {"no_value": 0, "no_relevant": 0}
    for i, v in enumerate(q_vals):
        if v is None:
            skipped["no_value"] += 1
            continue
        n_rel = sum(1 for j, w in enumerate(db_vals) if w == v and not (exclude_self and j == i))
        if n_rel == 0:
            skipped["no_relevant"] += 1
            continue
        rel = [db_vals[j] == v for j in top[i]]
        for k in ks:
            recalls[k].append(any(rel[:k]))
        found, ap = 0, 0.0
        for rank, r in enumerate(rel, 1):
            if r:
                found += 1
                ap += found / rank
        aps.append(ap / min(max(ks), n_rel))
    return {k: float(np.mean(v)) for k, v in recalls.items()}, float(np.mean(aps)), len(aps), skipped


def features(world, name: str):
    feats = extract_features(load_backbone_from(world["backbone"]), str(world[name]))
    paths = tar_paths(world[name])
    return feats, [paths[k] for k in feats.keys]


# ---- writers -> index metadata ------------------------------------------------------------------------


def test_source_names_reach_the_index_metadata(world):
    index = RetrievalIndex.load(world["index"])
    rows = index.rows_for(np.arange(len(index)), thumbnails=False)
    assert len(rows) == 18
    assert [r["source"] for r in rows] == [r["meta"]["path"] for r in rows]
    assert "bag/views/item_00.png" in [r["source"] for r in rows]
    assert index.field_values("source_stem").count("item_00") == 2
    assert index.field_values("path") == index.field_values("source")  # any field of the sample's .json
    assert index.field_values("no_such_field") == [None] * 18
    assert index_summary(world["index"])["with_source"] == 18

    assert source_stem("a/b/shoe_17.JPG") == "shoe_17" and source_stem("17") == "17"
    assert source_stem("pairs.jsonl:3") == "pairs.jsonl:3" and source_stem("v1.2.png") == "v1.2"
    assert sample_source({"index": 3, "source": "sklearn.datasets.load_digits"}) is None  # old digits shards
    assert sample_source({"index": 3}) is None and sample_source(None) is None
    assert sample_source({"source": 17}) == "17"
    with pytest.raises(ValueError, match="source name"):
        encode_sample(RawSample("k", _image(), meta={"source": ["x"]}), [])


def _image():
    from PIL import Image

    return Image.new("L", (4, 4))


# ---- index eval against brute force --------------------------------------------------------------------


@pytest.mark.parametrize("relevant", ["field:source_stem", "field:source"])
def test_instance_eval_matches_brute_force(world, relevant):
    got = evaluate_index(world["index"], str(world["sketches"]), relevant=relevant, ks=KS)
    (qf, q_paths), (df, d_paths) = features(world, "sketches"), features(world, "photos")
    to_val = stem if relevant == "field:source_stem" else (lambda p: p)
    recall, m_ap, n, skipped = brute_force(qf.feats, df.feats, [to_val(p) for p in q_paths],
                                           [to_val(p) for p in d_paths], KS)
    assert got["relevant"] == relevant and got["self"] is False
    assert got["queries"] == n == 10 and got["skipped"] == skipped == {"no_value": 0, "no_relevant": 1}
    for k in KS:
        assert got["recall"][f"@{k}"] == pytest.approx(recall[k], abs=1e-9)
    assert got["map@5"] == pytest.approx(m_ap, abs=1e-9)
    assert 0.5 < got["recall"]["@5"] < 1 and 0 < got["map@5"] < 1  # near its photo, even in random ViT features


def test_self_eval_leaves_each_member_out_and_matches_brute_force(world):
    got = evaluate_index(world["index"], relevant="field:source_stem", ks=KS)
    df, d_paths = features(world, "photos")
    stems = [stem(p) for p in d_paths]
    recall, m_ap, n, skipped = brute_force(df.feats, df.feats, stems, stems, KS, exclude_self=True)
    assert got["self"] is True and got["queries"] == n == 12  # the two views of items 0..5
    assert got["skipped"] == skipped == {"no_value": 0, "no_relevant": 6}
    for k in KS:
        assert got["recall"][f"@{k}"] == pytest.approx(recall[k], abs=1e-9)
    assert got["map@5"] == pytest.approx(m_ap, abs=1e-9) and 0 < m_ap < 1
    with pytest.raises(RetrievalError, match="no member can be scored"):
        evaluate_index(world["index"], relevant="key")  # keys are unique: nothing else is relevant


def test_key_and_label_relevance(world):
    qf, _ = features(world, "sketches")
    df, _ = features(world, "photos")
    for relevant, q_vals, d_vals in (("key", qf.keys, df.keys),
                                     ("label", qf.labels.tolist(), df.labels.tolist())):
        got = evaluate_index(world["index"], str(world["sketches"]), relevant=relevant, ks=KS)
        recall, m_ap, n, _ = brute_force(qf.feats, df.feats, list(q_vals), list(d_vals), KS)
        assert got["queries"] == n
        assert [got["recall"][f"@{k}"] for k in KS] == pytest.approx([recall[k] for k in KS], abs=1e-9)
        assert got["map@5"] == pytest.approx(m_ap, abs=1e-9)


def test_cli_eval_flags_and_errors(world, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["index", "eval", str(world["index"]), "--queries", str(world["sketches"]),
                 "--relevant", "field:source_stem", "--ks", "1,5", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["relevant"] == "field:source_stem"
    assert set(printed["recall"]) == {"@1", "@5"} and "map@5" in printed
    assert not list(tmp_path.glob(".*tmp"))
    assert main(["index", "eval", str(world["index"]), "--relevant", "colour"]) == 1
    assert "use label, key or field:NAME" in capsys.readouterr().err
    assert main(["index", "eval", str(world["index"]), str(world["sketches"]), "--relevant", "field:nope"]) == 1
    assert "no item of the index" in capsys.readouterr().err
    assert main(["index", "eval", str(world["index"]), str(world["sketches"]), "--queries", "x"]) == 1
    assert "give one" in capsys.readouterr().err


# ---- batch queries ----------------------------------------------------------------------------------------


def test_query_folder_list_and_shards_as_json_lines(world, tmp_path, capsys):
    folder = world["root"] / "sketch"
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "broken.png").write_bytes(b"\x89PNG not really")
    listing = tmp_path / "q" / "list.txt"
    listing.write_text(f"# two sketches and a missing file\n{folder / 'bag/item_00.png'}\nbroken.png\n\n"
                       "missing.png\n")
    out = tmp_path / "hits.jsonl"
    assert main(["query", str(world["index"]), "--image", str(folder), f"@{listing}", "--shards",
                 str(world["sketches"]), "-k", "3", "--jsonl", str(out), "--quiet", "--sheet",
                 str(tmp_path / "sheet.png"), "--sheet-rows", "4", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert "rank" not in captured.out and "23 queries answered" in captured.out
    assert "skipped 2 input(s)" in captured.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 11 + 1 + 11 and not list(tmp_path.glob(".*tmp"))
    by_folder, by_list, by_shards = records[:11], records[11:12], records[12:]
    assert [r["source"] for r in by_folder] == sorted(p.relative_to(folder).as_posix()
                                                      for p in folder.rglob("*.png"))
    assert by_list[0]["source"] == str(folder / "bag/item_00.png") and by_list[0]["kind"] == "image"
    assert [r["source"] for r in by_shards] == [r["source"] for r in by_folder]
    assert {r["kind"] for r in by_shards} == {"shard"} and all(r["shard"].endswith(".tar") for r in by_shards)
    for r in records:
        assert len(r["hits"]) == 3 and [h["rank"] for h in r["hits"]] == [1, 2, 3]
        assert all(h["source"].startswith(("bag/", "hat/", "shoe/")) for h in r["hits"])
    # a sketch image and the same sketch read from its shard get the same neighbours
    assert [h["key"] for h in by_folder[0]["hits"]] == [h["key"] for h in by_shards[0]["hits"]]
    assert (tmp_path / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # JSON lines on stdout: nothing else there
    assert main(["query", str(world["index"]), "--image", str(world["photos"]), "-k", "2", "--jsonl", "-"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 18 and {r["kind"] for r in lines} == {"shard"}  # a folder with a manifest: a shard set
    assert all(r["hits"][0]["source"] == r["source"] and r["hits"][0]["score"] == pytest.approx(1, abs=1e-5)
               for r in lines)  # each photo finds itself first
    assert "18 queries answered" in captured.err


def test_query_table_shows_sources_and_bad_input_is_clear(world, tmp_path, capsys):
    photo = world["root"] / "photo" / "hat" / "item_01.png"
    result = query_index(world["index"], images=[photo], k=2)
    assert result.hits[0][0]["source"] == "hat/item_01.png" and result.sources == [str(photo)]
    assert main(["query", str(world["index"]), "--image", str(photo), "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"query {photo}" in printed and "  hat/item_01.png " in printed  # the first hit's source
    (tmp_path / "empty").mkdir()
    assert main(["query", str(world["index"]), "--image", str(tmp_path / "empty")]) == 1
    assert "holds no image files" in capsys.readouterr().err
    assert main(["query", str(world["index"]), "--image", f"@{tmp_path / 'nope.txt'}"]) == 1
    assert "query list" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("missing.png\n")
    assert main(["query", str(world["index"]), "--image", f"@{tmp_path / 'bad.txt'}"]) == 1
    assert "all 1 inputs were skipped" in capsys.readouterr().err


# ---- old indexes and old shards --------------------------------------------------------------------------


def test_index_without_source_columns_still_reads_and_grows(world, tmp_path):
    old = tmp_path / "old"
    RetrievalIndex.load(world["index"]).save(old)
    with sqlite3.connect(old / META_NAME) as db:  # the metadata table as it was before source names
        db.execute("ALTER TABLE meta DROP COLUMN meta")
        db.execute("ALTER TABLE meta DROP COLUMN source")
    db.close()
    info = json.loads((old / INFO_NAME).read_text())
    info["sha256"][META_NAME] = hashlib.sha256((old / META_NAME).read_bytes()).hexdigest()
    (old / INFO_NAME).write_text(json.dumps(info))

    index = RetrievalIndex.load(old)
    assert index.rows_for([0])[0]["source"] is None and index.rows_for([0])[0]["key"] is not None
    with pytest.raises(RetrievalError, match="written before source names"):
        evaluate_index(old, str(world["sketches"]), relevant="field:source_stem")
    assert evaluate_index(old, str(world["sketches"]))["queries"] == 11  # labels still work
    x = np.ones((1, index.dim), np.float32)
    index.add(x, [{"key": "new", "source": "x/new.png", "meta": {"path": "x/new.png"}}])
    index.save(old)
    again = RetrievalIndex.load(old)
    assert again.rows_for([18])[0]["source"] == "x/new.png" and again.field_values("source_stem")[18] == "new"


def test_shards_without_source_names_have_none(world, tmp_path):
    from PIL import Image

    samples = [RawSample(f"{i:08d}", Image.fromarray(_pattern(i, 0, 0)), 0, None, {"index": i}) for i in range(3)]
    write_shard_set(samples, tmp_path / "plain", classes=["x"], source="old")
    build_index(world["backbone"], str(tmp_path / "plain"), tmp_path / "plain_index", thumbnails=False)
    rows = RetrievalIndex.load(tmp_path / "plain_index").rows_for([0, 1, 2])
    assert [r["source"] for r in rows] == [None] * 3 and rows[2]["meta"] == {"index": 2}
    got = evaluate_index(tmp_path / "plain_index", str(world["sketches"]), relevant="field:index")
    assert got["skipped"]["no_value"] == 0 and got["queries"] == 3  # sketch samples have an "index" too
