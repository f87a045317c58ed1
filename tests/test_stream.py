"""The streaming reader on real WebDataset tars: exactly-once splits, resume, bad input, decoding."""

from __future__ import annotations

import io
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2
from webdataset.tariterators import base_plus_ext

from shards.manifest import Manifest, ShardInfo, sha256_file
from shards.stream import ShardStream, to_float_tensor, worker_batch_sizes
from shards.tar import StreamError, StreamWarning, iter_tar_members, list_shards, split_key

UNEQUAL = [7, 3, 11, 1, 5]  # 27 samples: not divisible by 2 ranks, nor by 2 x 2 workers


def png_bytes(index: int, mode: str = "L", size: int = 8) -> bytes:
    rng = np.random.default_rng(index)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    folder: Path,
    sizes: list[int],
    *,
    mode: str = "L",
    captions: bool = False,
    manifest: bool = True,
    edit=None,
) -> list[Path]:
    """Shards `shard-NNNNNN.tar` of tiny images; sample i has key s{i:06d}, label i % 10, caption "item i".

    `edit(index, sample_dict)` may change or drop (return None) a sample before it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths, infos, index = [], [], 0
    for s, n in enumerate(sizes):
        path = folder / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for _ in range(n):
                sample = {"__key__": f"s{index:06d}", "png": png_bytes(index, mode), "cls": str(index % 10)}
                if captions:
                    sample["txt"] = f"item {index}"
                if edit is not None:
                    sample = edit(index, sample)
                if sample is not None:
                    w.write(sample)
                index += 1
        paths.append(path)
        infos.append(ShardInfo(path.name, n, sha256_file(path), path.stat().st_size))
    if manifest:
        Manifest(infos, image_mode=mode, image_size=[8, 8], has_captions=captions).save(folder)
    return paths


def run_epoch(stream: ShardStream, epoch: int | None = None) -> list[dict]:
    if epoch is not None:
        stream.set_epoch(epoch)
    return list(stream.loader())


def flat(batches: list[dict], field: str, pads: bool = True) -> list:
    out = []
    for b in batches:
        values = b[field].tolist() if isinstance(b[field], torch.Tensor) else list(b[field])
        out += [v for v, p in zip(values, b["pad"].tolist()) if pads or not p]
    return out


def raises_in_loader(loader, error: type[Exception], match: str) -> None:
    """`error` comes out of iterating `loader`."""
    batches = iter(loader)
    with pytest.raises(error, match=match):
        list(batches)
    # After a worker error torch leaves the iterator in a reference cycle; shut its workers down now, as
    # a later garbage collection would wait 5 s per worker.
    getattr(batches, "_shutdown_workers", lambda: None)()


def check_consistent(batches: list[dict]) -> None:
    """Keys, labels and indices of every sample belong together."""
    for b in batches:
        for key, index, label in zip(b["key"], b["index"].tolist(), b["label"].tolist()):
            assert key == f"s{index:06d}" and label == index % 10


@pytest.fixture
def unequal(tmp_path: Path) -> Path:
    write_shards(tmp_path / "set", UNEQUAL)
    return tmp_path / "set"


# ---- exactly once -----------------------------------------------------------------------------------------


def two_ranks(source, epoch: int, **kw) -> list[list[dict]]:
    kw = {"batch_size": 4, "num_workers": 2, "world_size": 2, "shuffle_buffer": 8, **kw}
    return [run_epoch(ShardStream(source, rank=r, **kw), epoch) for r in range(2)]


def test_pad_gives_every_sample_exactly_once_across_ranks_and_workers(unequal: Path) -> None:
    n = sum(UNEQUAL)
    orders = []
    for epoch in (0, 1):
        ranks = two_ranks(str(unequal), epoch, remainder="pad")
        assert (
            len(ranks[0])
            == len(ranks[1])
            == ShardStream(
                str(unequal), batch_size=4, world_size=2, rank=0, remainder="pad"
            ).batches_per_epoch()
            == 4
        )
        real = flat(ranks[0], "index", pads=False) + flat(ranks[1], "index", pads=False)
        assert sorted(real) == list(range(n))  # no duplicate, none missing
        assert [len(flat(r, "index")) for r in ranks] == [14, 14]  # ceil(27 / 2) each, one pad in all
        assert sum(b["pad"].sum().item() for r in ranks for b in r) == 1
        assert all(b["skipped"] == 0 for r in ranks for b in r)
        for r in ranks:
            check_consistent(r)
        orders.append([flat(r, "index") for r in ranks])
    assert orders[0] != orders[1]  # a new epoch reshuffles
    again = two_ranks(str(unequal), 1, remainder="pad")
    assert [flat(r, "index") for r in again] == orders[1]  # same (seed, epoch): same order


def test_drop_gives_no_duplicates_and_equal_counts(unequal: Path) -> None:
    ranks = two_ranks(str(unequal), 3, remainder="drop")
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert all(len(b["key"]) == 4 for r in ranks for b in r)  # full batches only
    indices = flat(ranks[0], "index") + flat(ranks[1], "index")
    assert len(indices) == len(set(indices)) == 24  # floor(floor(27 / 2) / 4) * 4 per rank, 3 left out
    assert not any(b["pad"].any() for r in ranks for b in r)
    seeds = [flat(r, "index") for r in two_ranks(str(unequal), 3, remainder="drop", seed=5)]
    assert seeds != [flat(r, "index") for r in ranks]  # the seed matters too


def test_one_shard_with_two_ranks_of_two_workers(tmp_path: Path) -> None:
    write_shards(tmp_path, [5])
    ranks = two_ranks(str(tmp_path), 0, remainder="pad", batch_size=2)
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert sorted(flat(ranks[0], "index", False) + flat(ranks[1], "index", False)) == [0, 1, 2, 3, 4]
    ranks = two_ranks(str(tmp_path), 0, remainder="drop", batch_size=2)
    indices = flat(ranks[0], "index") + flat(ranks[1], "index")
    assert len(indices) == len(set(indices)) == 4 and [len(r) for r in ranks] == [1, 1]
    # More workers than batches: worker 1 of each rank has nothing to read and yields nothing.
    ranks = two_ranks(str(tmp_path), 0, remainder="pad", batch_size=8)
    assert [len(r) for r in ranks] == [1, 1]
    assert sorted(flat(ranks[0], "index", False) + flat(ranks[1], "index", False)) == [0, 1, 2, 3, 4]


def test_no_shuffle_single_rank_reads_canonical_order(unequal: Path) -> None:
    stream = ShardStream(str(unequal), batch_size=5, shuffle=False, remainder="pad")
    assert flat(run_epoch(stream, 0), "index") == list(range(27))
    assert [len(b["key"]) for b in run_epoch(stream, 0)] == [5, 5, 5, 5, 5, 2]
    stream = ShardStream(str(unequal), batch_size=5, shuffle=False, remainder="drop")
    assert flat(run_epoch(stream, 0), "index") == list(range(25))  # the partial batch is not trained
    assert [len(b["key"]) for b in run_epoch(stream, 0)] == [5] * 5


def test_worker_batch_sizes_deal_batches_round_robin() -> None:
    assert worker_batch_sizes(10, 3, 2) == [[3, 3], [3, 1]]
    assert worker_batch_sizes(2, 4, 3) == [[2], [], []]
    assert worker_batch_sizes(0, 4, 2) == [[], []]


# ---- resume -----------------------------------------------------------------------------------------------


def random_view(image: Image.Image) -> torch.Tensor:
    x = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
    x = v2.RandomResizedCrop(8, scale=(0.3, 1.0), antialias=True)(x)
    return (x + 0.01 * torch.randn(()) + random.random()).as_subclass(torch.Tensor)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(unequal: Path, workers: int) -> None:
    def stream() -> ShardStream:
        return ShardStream(
            str(unequal), batch_size=3, num_workers=workers, transform=random_view, shuffle_buffer=6
        )

    full = run_epoch(stream(), 2)
    assert len(full) == 9
    for k in (1, 4, 8):
        resumed = stream()
        resumed.set_position(2, k)
        rest = list(resumed.loader())
        assert [b["key"] for b in rest] == [b["key"] for b in full[k:]]
        for a, b in zip(rest, full[k:]):
            assert torch.equal(a["image"], b["image"])
    resumed = stream()
    resumed.set_position(2, 9)
    assert list(resumed.loader()) == []


def test_views_depend_on_seed_epoch_and_index_only(unequal: Path) -> None:
    def views(workers: int, epoch: int) -> dict[int, torch.Tensor]:
        s = ShardStream(str(unequal), batch_size=4, num_workers=workers, transform=random_view)
        return {i: x for b in run_epoch(s, epoch) for i, x in zip(b["index"].tolist(), b["image"])}

    zero, two, other_epoch = views(0, 1), views(2, 1), views(0, 2)
    assert sorted(zero) == list(range(27))
    assert all(torch.equal(zero[i], two[i]) for i in zero)  # independent of the worker count
    assert sum(not torch.equal(zero[i], other_epoch[i]) for i in zero) > 20  # and random across epochs


def test_iteration_leaves_the_global_rng_alone(unequal: Path) -> None:
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    for workers in (0, 2):
        run_epoch(ShardStream(str(unequal), batch_size=4, num_workers=workers, transform=random_view), 0)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_set_position_and_loader_reject_misuse(unequal: Path) -> None:
    stream = ShardStream(str(unequal), batch_size=4, num_workers=2)
    assert len(stream.loader()) == stream.batches_per_epoch() == 7
    with pytest.raises(ValueError, match="batches_done=8"):
        stream.set_position(0, 8)
    with pytest.raises(ValueError, match="persistent"):
        stream.loader(persistent_workers=True)
    with pytest.raises(ValueError, match="num_workers=1"):
        stream.loader(num_workers=1)
    raises_in_loader(
        torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1), ValueError, "built for 2"
    )
    with pytest.raises(ValueError, match="remainder='pad'"):
        ShardStream(str(unequal), batch_size=4, world_size=30, rank=0, remainder="drop")
    with pytest.raises(ValueError, match="unknown"):
        ShardStream(str(unequal), batch_size=4, require=("labels",))


# ---- resampled --------------------------------------------------------------------------------------------


def test_resampled_epochs_have_fixed_length_and_are_reproducible(unequal: Path) -> None:
    def ranks(epoch: int) -> list[list[dict]]:
        return two_ranks(str(unequal), epoch, mode="resampled", epoch_samples=40, batch_size=3)

    first = ranks(0)
    assert [len(r) for r in first] == [7, 7]  # 40 // 2 = 20 samples per rank in ceil(20 / 3) batches
    assert [len(flat(r, "index")) for r in first] == [20, 20]
    for r in first:
        check_consistent(r)
        assert all(0 <= i < 27 for i in flat(r, "index"))
    assert [flat(r, "index") for r in ranks(0)] == [flat(r, "index") for r in first]
    assert [flat(r, "index") for r in ranks(1)] != [flat(r, "index") for r in first]
    resumed = ShardStream(
        str(unequal),
        batch_size=3,
        num_workers=2,
        world_size=2,
        rank=1,
        mode="resampled",
        epoch_samples=40,
        shuffle_buffer=8,
    )
    resumed.set_position(0, 3)
    assert [b["key"] for b in resumed.loader()] == [b["key"] for b in first[1][3:]]


# ---- bad input --------------------------------------------------------------------------------------------


def test_truncated_tar_warns_and_counts_what_the_manifest_promised(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, [6, 6, 6])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    stream = ShardStream(str(tmp_path), batch_size=4, shuffle=False, max_bad_fraction=0.5)
    with pytest.warns(StreamWarning, match=r"shard-000001\.tar.*samples skipped"):
        batches = run_epoch(stream, 0)
    real = flat(batches, "index", pads=False)
    missing = sorted(set(range(18)) - set(real))
    assert 0 < len(missing) < 6 and missing == list(range(12 - len(missing), 12))  # the tail of shard 1
    assert sum(b["skipped"] for b in batches) == len(missing)
    assert len(flat(batches, "index")) == 18  # padded back to the planned count
    assert sum(b["pad"].sum().item() for b in batches) == len(missing)


def test_corrupt_png_is_warned_skipped_and_counted(tmp_path: Path) -> None:
    def corrupt(index: int, sample: dict) -> dict:
        if index == 3:
            sample["png"] = sample["png"][:40] + b"\0" * 30
        return sample

    write_shards(tmp_path, [5, 5], edit=corrupt)
    stream = ShardStream(str(tmp_path), batch_size=4, max_bad_fraction=0.2)
    with pytest.warns(StreamWarning, match=r"shard-000000\.tar: sample 's000003': unreadable image"):
        batches = run_epoch(stream, 0)
    assert sorted(flat(batches, "index", pads=False)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert sum(b["skipped"] for b in batches) == 1 and len(flat(batches, "index")) == 10


def test_missing_label_is_bad_only_when_required(tmp_path: Path) -> None:
    def unlabel(index: int, sample: dict) -> dict:
        if index == 2:
            del sample["cls"]
        return sample

    write_shards(tmp_path, [4], edit=unlabel)
    batches = run_epoch(ShardStream(str(tmp_path), batch_size=4, shuffle=False), 0)
    assert flat(batches, "label") == [0, 1, -1, 3]
    stream = ShardStream(str(tmp_path), batch_size=4, shuffle=False, require=("label",), max_bad_fraction=0.5)
    with pytest.warns(StreamWarning, match="'s000002': no label"):
        batches = run_epoch(stream, 0)
    assert flat(batches, "index", pads=False) == [0, 1, 3] and batches[0]["skipped"] == 1


def test_empty_shards_are_warned_and_skipped(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, [3, 0, 4, 2])
    with pytest.warns(StreamWarning, match=r"shard-000001\.tar: shard holds no samples"):
        stream = ShardStream(str(tmp_path), batch_size=4, max_bad_fraction=0.5)
    assert stream.empty_shards == [str(paths[1])] and stream.total == 9
    assert sorted(flat(run_epoch(stream, 0), "index")) == list(range(9))
    paths[3].write_bytes(b"")  # a zero-byte shard the manifest says holds 2
    with pytest.warns(StreamWarning, match=r"shard-000003\.tar: unreadable after sample 0"):
        batches = run_epoch(stream, 0)
    assert sorted(flat(batches, "index", pads=False)) == list(range(7))
    assert sum(b["skipped"] for b in batches) == 2


def test_too_many_bad_samples_raise_stream_error(tmp_path: Path) -> None:
    def corrupt(index: int, sample: dict) -> dict:
        if index % 4 == 1:
            sample["png"] = b"not a png"
        return sample

    write_shards(tmp_path, [10, 10], edit=corrupt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StreamWarning)
        with pytest.raises(
            StreamError, match=r"bad samples of \d+ read \(20 planned\) exceed max_bad_fraction=0.1"
        ):
            run_epoch(ShardStream(str(tmp_path), batch_size=4, max_bad_fraction=0.1), 0)
        # Raised in a worker process, re-raised here with its message.
        raises_in_loader(
            ShardStream(str(tmp_path), batch_size=4, num_workers=2).loader(),
            StreamError,
            "max_bad_fraction=0.01",
        )
        batches = run_epoch(ShardStream(str(tmp_path), batch_size=4, max_bad_fraction=0.3), 0)
    assert sum(b["skipped"] for b in batches) == 5


def test_missing_paths_and_empty_globs_are_clear_errors(tmp_path: Path) -> None:
    write_shards(tmp_path, [2, 2])
    with pytest.raises(FileNotFoundError, match="shard not found: .*nowhere.tar"):
        ShardStream(str(tmp_path / "nowhere.tar"), batch_size=2)
    with pytest.raises(FileNotFoundError, match=r"no files match the glob .*\*\.tgz"):
        ShardStream(str(tmp_path / "*.tgz"), batch_size=2)
    with pytest.raises(FileNotFoundError, match=r"shard-000002\.tar \(from source .*\{000000\.\.000002\}"):
        ShardStream(str(tmp_path / "shard-{000000..000002}.tar"), batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither manifest.json nor any .tar"):
        ShardStream(str(tmp_path / "empty"), batch_size=2)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shards that are missing: \['shard-000001.tar'\]"):
        ShardStream(str(tmp_path), batch_size=2)


# ---- decoding and sources ---------------------------------------------------------------------------------


def test_grayscale_stays_one_channel_and_values_survive(tmp_path: Path) -> None:
    write_shards(tmp_path / "gray", [3])
    write_shards(tmp_path / "rgb", [3], mode="RGB")
    gray = run_epoch(ShardStream(str(tmp_path / "gray"), batch_size=3, shuffle=False), 0)[0]["image"]
    rgb = run_epoch(ShardStream(str(tmp_path / "rgb"), batch_size=3, shuffle=False), 0)[0]["image"]
    assert gray.shape == (3, 1, 8, 8) and gray.dtype == torch.float32 and rgb.shape == (3, 3, 8, 8)
    expected = np.asarray(Image.open(io.BytesIO(png_bytes(2)))) / 255.0
    assert torch.allclose(gray[2, 0], torch.from_numpy(expected).float())
    modes = []
    run_epoch(
        ShardStream(str(tmp_path / "gray"), batch_size=3, transform=lambda im: modes.append(im.mode) or 0), 0
    )
    assert modes == ["L", "L", "L"]


def test_captions_labels_and_multi_view_transforms_come_through(tmp_path: Path) -> None:
    write_shards(tmp_path, [4, 3], captions=True)
    two_views = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    stream = ShardStream(
        str(tmp_path),
        batch_size=7,
        shuffle=False,
        transform=lambda im: [two_views(im)] * 2,
        require=("label", "caption"),
    )
    batch = run_epoch(stream, 0)[0]
    assert batch["caption"] == [f"item {i}" for i in range(7)]
    assert batch["label"].tolist() == [i % 10 for i in range(7)] and batch["label"].dtype == torch.int64
    assert isinstance(batch["image"], list) and [v.shape for v in batch["image"]] == [(7, 1, 8, 8)] * 2
    nocap = tmp_path / "nocap"
    write_shards(nocap, [3])
    with pytest.warns(StreamWarning, match="no caption"), pytest.raises(StreamError):
        run_epoch(ShardStream(str(nocap), batch_size=3, require=("caption",)), 0)


def test_shards_without_manifest_are_counted_by_a_scan(tmp_path: Path) -> None:
    write_shards(tmp_path, UNEQUAL, manifest=False)
    expected = [(str(tmp_path / f"shard-{i:06d}.tar"), n) for i, n in enumerate(UNEQUAL)]
    assert list_shards(str(tmp_path / "shard-*.tar")) == expected
    assert list_shards(str(tmp_path / "shard-{000000..000004}.tar")) == expected
    assert list_shards(str(tmp_path)) == expected
    assert list_shards([p for p, _ in expected[:2]]) == expected[:2]
    assert list_shards(f"{expected[3][0]},{expected[0][0]}") == [expected[3], expected[0]]
    ranks = two_ranks(str(tmp_path / "shard-*.tar"), 0, remainder="pad")
    assert sorted(flat(ranks[0], "index", False) + flat(ranks[1], "index", False)) == list(range(27))


def test_tar_reader_matches_tarfile_on_long_names_pax_and_directories(tmp_path: Path) -> None:
    members = {f"{'d' * 120}/sample.{i}.png": bytes([i]) * (300 + 700 * i) for i in range(3)}
    members["short.cls"] = b"7"
    members["\u00e9t\u00e9.txt"] = "caf\u00e9".encode()
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            folder = tarfile.TarInfo("adir")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
            for name, data in members.items():  # ustar fits the 120-character folder into its prefix field
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            ours = list(iter_tar_members(f))
        with tarfile.open(path) as tf:
            theirs = [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
        assert ours == theirs and len(ours) == 5
        damaged = bytearray(path.read_bytes())
        damaged[0] ^= 0xFF
        with pytest.raises(tarfile.ReadError, match="checksum"):
            list(iter_tar_members(io.BytesIO(bytes(damaged))))


def test_keys_split_as_webdataset_does() -> None:
    names = [
        "a.png",
        "dir/s001.seg.png",
        "d.x/s1.cls",
        "noext",
        ".hidden",
        "a/b/c.d.e",
        "k.",
        "x/",
        "a_b.JPG",
    ]
    for name in names:
        assert split_key(name) == base_plus_ext(name), name
    assert split_key("dir/.hidden.txt") == (None, None)  # webdataset's regex makes this key "dir/"


def test_to_float_tensor_equals_transforms_v2() -> None:
    rng = np.random.default_rng(0)
    for shape, mode in (((5, 7), "L"), ((5, 7, 3), "RGB")):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        expected = v2.functional.to_dtype(v2.functional.pil_to_tensor(image), torch.float32, scale=True)
        got = to_float_tensor(image)
        assert torch.equal(got, expected) and got.is_contiguous() and got.shape == expected.shape


def test_reads_the_writers_digits_shard_set_exactly_once(digits_shards: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    ranks = two_ranks(str(digits_shards), 0, remainder="pad", batch_size=64, shuffle_buffer=100)
    assert len(ranks[0]) == len(ranks[1]) == 15  # ceil(1797 / 2) = 899 per rank
    seen: dict[int, torch.Tensor] = {}
    for batches in ranks:
        for b in batches:
            for i, key, label, caption, image, pad in zip(
                b["index"].tolist(),
                b["key"],
                b["label"].tolist(),
                b["caption"],
                b["image"],
                b["pad"].tolist(),
            ):
                assert key == f"{i:08d}" and label == digits.target[i] and caption.startswith("a handwritten")
                if not pad:
                    assert i not in seen
                    seen[i] = image
    assert sorted(seen) == list(range(1797))
    expected = torch.from_numpy((digits.images[5] * (255 / 16)).round().clip(0, 255) / 255).float()
    assert seen[5].shape == (1, 8, 8) and torch.allclose(seen[5][0], expected)


# ---- remainder="drop": full batches only ------------------------------------------------------------------


def test_drop_yields_only_full_batches_on_the_digits(digits_shards: Path) -> None:
    one = ShardStream(str(digits_shards), batch_size=64, remainder="drop", shuffle_buffer=100)
    assert one.samples_per_epoch() == 1792 and one.batches_per_epoch() == 28  # 1797 // 64 = 28 full batches
    dropped = []
    for epoch in (0, 1):
        batches = run_epoch(one, epoch)
        assert [len(b["key"]) for b in batches] == [64] * 28  # none smaller
        seen = flat(batches, "index")
        assert len(set(seen)) == 1792 and not any(b["pad"].any() for b in batches)
        dropped.append(set(range(1797)) - set(seen))
    assert len(dropped[0]) == len(dropped[1]) == 5 and dropped[0] != dropped[1]  # a different few each epoch
    ranks = two_ranks(str(digits_shards), 0, remainder="drop", batch_size=64, shuffle_buffer=100)
    assert [len(r) for r in ranks] == [14, 14]  # 1797 // 2 = 898 per rank: 14 full batches of 64
    assert all(len(b["key"]) == 64 for r in ranks for b in r)
    indices = flat(ranks[0], "index") + flat(ranks[1], "index")
    assert len(indices) == len(set(indices)) == 2 * 14 * 64


def test_drop_changes_the_left_out_samples_even_with_one_shard(tmp_path: Path) -> None:
    write_shards(tmp_path, [10])
    stream = ShardStream(str(tmp_path), batch_size=4, shuffle_buffer=1, remainder="drop")
    left_out = {frozenset(set(range(10)) - set(flat(run_epoch(stream, e), "index"))) for e in range(6)}
    assert all(len(s) == 2 for s in left_out) and len(left_out) > 1
    for workers in (0, 2):  # resume mid-epoch: the same rotation, the same remaining batch
        full = run_epoch(ShardStream(str(tmp_path), batch_size=4, num_workers=workers, remainder="drop"), 3)
        resumed = ShardStream(str(tmp_path), batch_size=4, num_workers=workers, remainder="drop")
        resumed.set_position(3, 1)
        assert [b["key"] for b in resumed.loader()] == [b["key"] for b in full[1:]] and len(full) == 2
    with pytest.raises(ValueError, match="batches_done=3"):
        resumed.set_position(3, 3)


def test_drop_without_a_full_batch_is_a_clear_error(tmp_path: Path) -> None:
    write_shards(tmp_path, [5, 4])
    with pytest.raises(
        ValueError, match=r"9 samples over world_size=2 ranks is 4 per rank, fewer than batch_size=5.*remainder='pad'"
    ):
        ShardStream(str(tmp_path), batch_size=5, world_size=2, rank=0, remainder="drop")
    padded = ShardStream(str(tmp_path), batch_size=5, world_size=2, rank=0, remainder="pad")
    assert padded.batches_per_epoch() == 1 and padded.samples_per_epoch() == 5
