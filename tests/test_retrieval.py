"""FAISS retrieval index, SQLite metadata, evaluation metrics and contact sheets (real FAISS, real SQLite)."""

from __future__ import annotations

import io
import json
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from downstream.contact_sheet import contact_sheet_png, thumbnail_png, to_image
from downstream.metrics import approximate_recall, mean_average_precision, recall_at_k
from downstream.retrieval import (
    INDEX_NAME,
    INFO_NAME,
    META_NAME,
    RetrievalError,
    RetrievalIndex,
    default_factory,
    exact_search,
)
from shards.ownership import MARKER_NAME

INFO = {"fingerprint": "ckpt-aaaa", "pooling": "cls"}


def clustered(n: int, dim: int = 32, centres: int = 40, spread: float = 0.35, seed: int = 0):
    """Points near random centres; labels are the centre index."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    labels = rng.integers(0, centres, n)
    x = c[labels] + spread * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


def make_rows(labels, prefix: str = "s", thumbs: bool = False) -> list[dict]:
    rows = []
    for i, lab in enumerate(labels):
        row = {"key": f"{prefix}{i:06d}", "shard": "shard-000000.tar", "label": int(lab), "label_name": f"class{lab}",
               "caption": f"a picture of class {lab}"}
        if thumbs:
            row["thumbnail"] = thumbnail_png(np.full((28, 28), (lab * 37) % 256, dtype=np.uint8))
        rows.append(row)
    return rows


def brute_force_cosine(db: np.ndarray, q: np.ndarray, k: int):
    dbn = torch.nn.functional.normalize(torch.from_numpy(db).double(), dim=1)
    qn = torch.nn.functional.normalize(torch.from_numpy(q).double(), dim=1)
    scores, ids = (qn @ dbn.T).topk(k, dim=1)
    return scores.numpy(), ids.numpy()


@pytest.fixture(scope="module")
def small():
    x, labels = clustered(600, seed=1)
    return x * np.random.default_rng(2).uniform(0.5, 3.0, (600, 1)).astype(np.float32), labels  # varied norms


@pytest.fixture
def saved(tmp_path, small):
    x, labels = small
    idx = RetrievalIndex.build(x, make_rows(labels, thumbs=True), info=INFO)
    folder = idx.save(tmp_path / "index")
    return idx, folder


# ---- exact search ---------------------------------------------------------------------------------------


def test_exact_search_matches_brute_force_cosine(small):
    x, labels = small
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO)
    assert idx.info["factory"] == "Flat" and len(idx) == 600 and idx.dim == 32
    q = np.random.default_rng(5).standard_normal((25, 32)).astype(np.float32) * 4
    scores, ids = idx.search(q, 7)
    want_scores, want_ids = brute_force_cosine(x, q, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_search_excluding_the_query_itself(small):
    x, labels = small
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO)
    members = np.array([0, 17, 599])
    _, with_self = idx.search(x[members], 5)
    np.testing.assert_array_equal(with_self[:, 0], members)  # a member is its own nearest neighbour
    _, without = idx.search(x[members], 5, exclude_ids=members)
    np.testing.assert_array_equal(without, idx.search(x[members], 6)[1][:, 1:])
    assert not (without == members[:, None]).any()
    _, none_excluded = idx.search(x[members], 5, exclude_ids=[-1, -1, -1])  # -1: exclude nothing
    np.testing.assert_array_equal(none_excluded, with_self)
    _, by_key = idx.search_by_keys(["s000017"], 5)
    np.testing.assert_array_equal(by_key[0], without[1])
    np.testing.assert_array_equal(exact_search(idx.vectors(np.arange(600)), x[members], 5, exclude_ids=members)[1],
                                  without)


def test_search_more_than_stored_pads_with_minus_one():
    x, labels = clustered(4, seed=3)
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO)
    _, ids = idx.search(x[:2], 6, exclude_ids=[0, 1])
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
    assert 0 not in ids[0] and 1 not in ids[1]
    rows = idx.rows_for(ids)
    assert rows[0][3] is None and rows[0][0]["key"].startswith("s")


def test_unnormalised_index_ranks_by_inner_product(small):
    x, labels = small
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO, normalize=False)
    q = x[:3] + 0.5
    scores, ids = idx.search(q, 4)
    want = torch.from_numpy(q).double() @ torch.from_numpy(x).double().T
    np.testing.assert_array_equal(ids, want.topk(4, dim=1).indices.numpy())
    np.testing.assert_allclose(idx.vector(5), x[5])  # stored as given
    assert idx.info["normalized"] is False


# ---- metadata -------------------------------------------------------------------------------------------


def test_metadata_lookup_and_vectors(small):
    x, labels = small
    rows = make_rows(labels, thumbs=True)
    idx = RetrievalIndex.build(x, rows, info=INFO)
    i = idx.lookup_key("s000042")
    assert i == 42
    v = idx.vector(i)
    np.testing.assert_allclose(v, x[42] / np.linalg.norm(x[42]), atol=1e-6)
    got = idx.rows_for([42, 7])
    assert [r["key"] for r in got] == ["s000042", "s000007"]
    assert got[0] == {"id": 42, "source": None, "meta": None, **rows[42]}  # rows without source names
    assert Image.open(io.BytesIO(got[0]["thumbnail"])).size == (28, 28)
    assert "thumbnail" not in idx.rows_for([1], thumbnails=False)[0]
    np.testing.assert_array_equal(idx.labels(), labels)
    with pytest.raises(KeyError, match="no indexed item with key 'nope'"):
        idx.lookup_key("nope")
    with pytest.raises(RetrievalError, match="id 600 is not in the index"):
        idx.vector(600)


def test_bad_input_is_refused_clearly(small):
    x, labels = small
    rows = make_rows(labels)
    with pytest.raises(RetrievalError, match="600 embeddings but 599 metadata rows"):
        RetrievalIndex.build(x, rows[:-1], info=INFO)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(RetrievalError, match="row 3 has NaN"):
        RetrievalIndex.build(bad, rows, info=INFO)
    zero = x.copy()
    zero[9] = 0
    with pytest.raises(RetrievalError, match="row 9 is all zeros"):
        RetrievalIndex.build(zero, rows, info=INFO)
    with pytest.raises(RetrievalError, match=r"unknown field\(s\) \['colour'\]; valid: key"):
        RetrievalIndex.build(x[:2], [{"key": "a"}, {"key": "b", "colour": "red"}], info=INFO)
    with pytest.raises(RetrievalError, match="duplicate key"):
        RetrievalIndex.build(x[:2], [{"key": "a"}, {"key": "a"}], info=INFO)
    with pytest.raises(RetrievalError, match="thumbnail must be PNG bytes"):
        RetrievalIndex.build(x[:1], [{"key": "a", "thumbnail": b"JFIF...."}], info=INFO)
    with pytest.raises(RetrievalError, match="label must be an int"):
        RetrievalIndex.build(x[:1], [{"key": "a", "label": "shoe"}], info=INFO)
    with pytest.raises(RetrievalError, match="must be a 2-D array"):
        RetrievalIndex.build(x[0], rows[:1], info=INFO)
    with pytest.raises(RetrievalError, match="records dim itself"):
        RetrievalIndex.build(x, rows, info={"dim": 5})
    with pytest.raises(RetrievalError, match="leave out IDMap"):
        RetrievalIndex.build(x, rows, info=INFO, factory="IDMap,Flat")
    with pytest.raises(RetrievalError, match="cannot make factory 'NoSuchIndex'"):
        RetrievalIndex.build(x, rows, info=INFO, factory="NoSuchIndex")
    idx = RetrievalIndex.build(x, rows, info=INFO)
    with pytest.raises(RetrievalError, match="dimension 16, the index has 32"):
        idx.search(np.ones((2, 16), np.float32), 3)
    with pytest.raises(RetrievalError, match="k must be a positive integer"):
        idx.search(x[:1], 0)
    with pytest.raises(RetrievalError, match="2 queries but 1 exclude_ids"):
        idx.search(x[:2], 3, exclude_ids=[0])


# ---- add ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exact_below", [100_000, 100])  # Flat, then IVF (trained once, lists grow)
def test_add_after_build_finds_new_vectors(exact_below):
    x, labels = clustered(900, seed=4)
    base, extra = x[:800], x[800:] * 3 + 1.0
    idx = RetrievalIndex.build(base, make_rows(labels[:800]), info=INFO, exact_below=exact_below)
    ids = idx.add(extra, make_rows(labels[800:], prefix="new"))
    np.testing.assert_array_equal(ids, np.arange(800, 900))
    assert len(idx) == 900 and idx.info["count"] == 900
    _, found = idx.search(extra, 1)
    np.testing.assert_array_equal(found[:, 0], ids)  # each added vector is its own nearest neighbour
    assert idx.rows_for(found[:2, 0])[1]["key"] == "new000001"
    assert idx.lookup_key("new000099") == 899
    np.testing.assert_allclose(idx.vector(850), extra[50] / np.linalg.norm(extra[50]), atol=1e-6)
    assert idx.labels()[850] == labels[850]


def test_failed_add_changes_nothing(small):
    x, labels = small
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO)
    with pytest.raises(RetrievalError, match="duplicate key"):
        idx.add(x[:2], [{"key": "fresh"}, {"key": "s000003"}])  # second key already indexed
    assert len(idx) == 600
    with pytest.raises(KeyError):
        idx.lookup_key("fresh")
    assert idx.add(x[:1], [{"key": "fresh"}]).tolist() == [600]


# ---- save / load ----------------------------------------------------------------------------------------


def test_save_load_round_trip_is_identical(saved, small):
    idx, folder = saved
    x, _ = small
    assert sorted(p.name for p in folder.iterdir()) == sorted([INDEX_NAME, INFO_NAME, META_NAME, MARKER_NAME])
    assert not list(folder.parent.glob("*.tmp"))
    info = json.loads((folder / INFO_NAME).read_text())
    assert info["fingerprint"] == "ckpt-aaaa" and info["pooling"] == "cls" and info["dim"] == 32
    assert info["count"] == 600 and info["normalized"] is True and info["factory"] == "Flat"
    loaded = RetrievalIndex.load(folder, expect={"fingerprint": "ckpt-aaaa", "dim": 32})
    q = x[::37] + 0.1
    s1, i1 = idx.search(q, 10)
    s2, i2 = loaded.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    assert loaded.rows_for(i2) == idx.rows_for(i1)
    assert loaded.info == idx.info
    np.testing.assert_array_equal(loaded.vector(9), idx.vector(9))


def test_loaded_index_can_grow_and_be_saved_in_place(saved, small):
    _, folder = saved
    x, _ = small
    loaded = RetrievalIndex.load(folder)
    loaded.add(x[:2] + 5, [{"key": "p"}, {"key": "q"}])
    loaded.save(folder)  # replaces the folder its metadata was read from
    again = RetrievalIndex.load(folder)
    assert len(again) == 602 and again.lookup_key("q") == 601 and again.lookup_key("s000000") == 0
    assert not list(folder.parent.glob("*.tmp"))


def test_ivf_round_trip_keeps_tuned_nprobe(tmp_path):
    x, labels = clustered(3000, seed=6)
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO, exact_below=1000)
    nprobe = idx.info["search_params"]["nprobe"]
    loaded = RetrievalIndex.load(idx.save(tmp_path / "ivf"))
    assert loaded.info["search_params"] == {"nprobe": nprobe}
    s1, i1 = idx.search(x[:50], 10)
    s2, i2 = loaded.search(x[:50], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)


def test_load_refuses_an_unexpected_checkpoint_or_dim(saved):
    _, folder = saved
    with pytest.raises(RetrievalError, match="fingerprint = 'ckpt-aaaa', expected 'ckpt-bbbb'"):
        RetrievalIndex.load(folder, expect={"fingerprint": "ckpt-bbbb"})
    with pytest.raises(RetrievalError, match="dim = 32, expected 384"):
        RetrievalIndex.load(folder, expect={"dim": 384})
    with pytest.raises(RetrievalError, match="records no 'model'; expected 'vit_tiny'"):
        RetrievalIndex.load(folder, expect={"model": "vit_tiny"})


def test_load_refuses_missing_or_incomplete_folders(saved, tmp_path):
    _, folder = saved
    with pytest.raises(RetrievalError, match="no retrieval index folder"):
        RetrievalIndex.load(tmp_path / "absent")
    (folder / META_NAME).unlink()
    with pytest.raises(RetrievalError, match=f"has no {META_NAME}"):
        RetrievalIndex.load(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_load_refuses_a_corrupt_index_file(saved, damage):
    _, folder = saved
    path = folder / INDEX_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a faiss index" * 10)
    with pytest.raises(RetrievalError, match="does not match the checksum"):
        RetrievalIndex.load(folder)
    # Without the checksum FAISS itself fails deep inside; that is explained too.
    with pytest.raises(RetrievalError, match="index.faiss is truncated or corrupt; FAISS could not read it"):
        RetrievalIndex.load(folder, verify=False)


def test_load_refuses_metadata_that_disagrees_with_the_vectors(saved):
    _, folder = saved
    with sqlite3.connect(folder / META_NAME) as db:
        db.execute("DELETE FROM meta WHERE id >= 590")
    db.close()
    with pytest.raises(RetrievalError, match="does not match the checksum"):
        RetrievalIndex.load(folder)
    with pytest.raises(RetrievalError, match="600 vectors in index.faiss but 590 metadata rows"):
        RetrievalIndex.load(folder, verify=False)
    (folder / META_NAME).write_bytes(b"not sqlite" * 50)
    with pytest.raises(RetrievalError, match="not a readable metadata database"):
        RetrievalIndex.load(folder, verify=False)


# ---- approximate indexes above the threshold ------------------------------------------------------------


def test_default_factory_switches_at_the_threshold():
    assert default_factory(99_999) == "Flat"
    assert default_factory(1_000_000) == "IVF4000,Flat"
    assert default_factory(200, exact_below=100) == "IVF5,Flat"  # at least 39 training points per list


@pytest.mark.parametrize("factory", [None, "HNSW16,Flat"])
def test_approximate_index_above_threshold_recalls_exact_neighbours(factory):
    x, labels = clustered(4000, dim=32, centres=60, seed=7)
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO, exact_below=1000, factory=factory, tune_queries=200)
    kind = "IVF" if factory is None else "HNSW"
    assert idx.info["factory"].startswith(kind) and kind in type(idx.index).__name__
    param = "nprobe" if factory is None else "efSearch"
    assert idx.info["tuning"]["table"][-1][1] >= 0.95 and param in idx.info["search_params"]
    # Fresh queries from the same distribution, measured against brute force.
    q, _ = clustered(300, dim=32, centres=60, seed=7)  # same centres (same seed), new draws below
    q = q + 0.2 * np.random.default_rng(99).standard_normal(q.shape).astype(np.float32)
    _, approx = idx.search(q, 10)
    _, exact = brute_force_cosine(x, q, 10)
    assert approximate_recall(approx, exact, 10) >= 0.9


def test_any_factory_string_is_accepted(small):
    x, labels = small
    # Named factories apply whatever the size; 8-bit scalar quantisation keeps vectors close to exact.
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO, factory="IVF8,SQ8")
    assert idx.info["factory"] == "IVF8,SQ8" and idx.info["search_params"]["nprobe"] >= 1
    _, ids = idx.search(x[:50], 5)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
    np.testing.assert_allclose(idx.vector(3), x[3] / np.linalg.norm(x[3]), atol=0.05)  # lossy reconstruction


# ---- evaluation metrics ---------------------------------------------------------------------------------


def test_recall_at_k_on_a_hand_made_case():
    query = [0, 1, 2]
    retrieved = [[1, 0, 0], [1, 1, 2], [0, 0, -1]]
    assert recall_at_k(query, retrieved, ks=(1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3),
                                                            3: pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="recall@4 needs 1 <= k <= 3"):
        recall_at_k(query, retrieved, ks=(4,))


def test_mean_average_precision_on_a_hand_made_case():
    query = [0, 1, 2]
    retrieved = [[1, 0, 0], [1, 1, 2], [0, 0, 0]]
    # q0: relevant at ranks 2 and 3 -> precisions 1/2, 2/3; q1: ranks 1, 2 -> 1, 1; q2: none.
    assert mean_average_precision(query, retrieved) == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 + 0) / 3)
    assert mean_average_precision(query, retrieved, num_relevant=[4, 2, 1]) == pytest.approx(
        ((1 / 2 + 2 / 3) / 3 + 1 + 0) / 3)
    assert mean_average_precision(query, retrieved, k=1) == pytest.approx(1 / 3)
    assert mean_average_precision([5], [[5, 5, 5]], num_relevant=[3]) == 1.0


def test_approximate_recall_on_a_hand_made_case():
    exact = [[1, 2, 3], [4, 5, -1]]  # the second query has only two true neighbours
    approx = [[3, 9, 1], [5, 4, 8]]
    assert approximate_recall(approx, exact, 3) == pytest.approx((2 + 2) / (3 + 2))
    assert approximate_recall(approx, exact, 1) == 0.0
    assert approximate_recall(approx, exact, 2) == pytest.approx(2 / 4)


def test_evaluate_self_on_a_hand_made_index():
    # Label 0 at angles 0, .05, .1, .15 on the unit circle, an odd label-1 item at .07 among them, and
    # three label-1 items near 1.5 rad. Nearest other member by hand: 0->.05 hit, .05->.07 miss, .1->.07 miss,
    # .15->.1 hit, .07->.05 miss, and the three near 1.5 hit.
    angles = np.array([0.0, 0.05, 0.1, 0.15, 0.07, 1.5, 1.55, 1.6])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    idx = RetrievalIndex.build(x, make_rows(labels), info=INFO)
    got = idx.evaluate_self(ks=(1, 3))
    assert got["queries"] == 8
    assert got["recall@1"] == pytest.approx(5 / 8)
    assert got["recall@3"] == pytest.approx(7 / 8)  # only the odd item finds no label-1 item in its top 3
    # Every label has 3 other members. Relevance of the top 3: [1,0,1] for angles 0 and .15, [0,1,1] for .05
    # and .1, none for .07, [1,1,0] for the three near 1.5 rad.
    want = (2 * (1 + 2 / 3) / 3 + 2 * (1 / 2 + 2 / 3) / 3 + 0 + 3 * (2 / 3)) / 8
    assert got["mAP@3"] == pytest.approx(want)


# ---- contact sheet --------------------------------------------------------------------------------------


def test_contact_sheet_from_index_rows(saved, tmp_path):
    idx, _ = saved
    scores, ids = idx.search_by_keys(["s000001", "s000002"], 4)
    rows = idx.rows_for(ids)
    results = [[{**r, "score": float(s), "match": r["label"] == 1} for r, s in zip(line, sl)]
               for line, sl in zip(rows, scores)]
    queries = [np.zeros((28, 28), np.uint8), Image.new("RGB", (40, 30), "red")]
    out = contact_sheet_png(queries, results, tmp_path / "sheets" / "sheet.png", query_titles=["first", "second"])
    assert out == tmp_path / "sheets" / "sheet.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    assert img.width > img.height > 100  # two rows of five cells
    assert not list(out.parent.glob("*.tmp"))


def test_contact_sheet_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must end in .png"):
        contact_sheet_png([np.zeros((4, 4))], [[]], tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="2 queries but 1 result lists"):
        contact_sheet_png([np.zeros((4, 4))] * 2, [[]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="cannot show an array of shape"):
        contact_sheet_png([np.zeros((5, 5, 7))], [[]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_images_and_thumbnails():
    chw = np.random.default_rng(0).random((3, 8, 10))  # floats in [0, 1], channels first
    img = to_image(chw)
    assert img.size == (10, 8) and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.rint(chw[0] * 255).astype(np.uint8))
    assert to_image(torch.zeros(1, 5, 6)).mode == "L"
    png = thumbnail_png(np.zeros((100, 50, 3), np.uint8), size=32)
    thumb = Image.open(io.BytesIO(png))
    assert thumb.format == "PNG" and thumb.size == (16, 32)
    assert to_image(png).size == (16, 32)
    with pytest.raises(ValueError, match="not a readable picture"):
        to_image(b"nope")
