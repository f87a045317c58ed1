"""Every decoded image is bounded (issue 24, item 2): a thin image (1 x 2M pixels compresses to 4 KB) once passed the
service's pixel cap and the eval transform's shorter-side resize blew it up to 16 x 33M (5.8 GB, 14 s). Now one
check (`shards.bounds.check_image_size`, from the header) refuses it in the upload, the shard stream, feature
extraction, `query` and the eval transform, and normal images come out of the transform exactly as before."""

from __future__ import annotations

import io
import pickle
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_serve import running, tiny_backbone
from torchvision.transforms import v2

from downstream.features import FeatureError, extract_features
from downstream.search import build_index, query_index
from downstream.serve import ServeError
from downstream.serve_app import create_app, decode_upload
from pretrain.restore import load_backbone_from
from pretrain.transforms import EnsureMode, eval_transform, normalize_stats
from shards.__main__ import main as shards_main
from shards.bounds import MAX_ASPECT, ImageBoundsError, check_image_size
from shards.manifest import load_manifest
from shards.record import decode_image, read_image
from shards.stream import ShardStream
from shards.tar import StreamWarning, iter_tar_samples, open_shard

THIN = 2_097_152  # 1 x 2,097,152: under the service's 16.8 Mpx cap, 4 KB as a PNG; 5.8 GB once resized
THINNER = 16_777_216  # 1 x 16.7M: exactly at the cap, 33 KB; 13 GB once resized


def png(width: int, height: int, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 128).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def thin_pngs() -> dict[int, bytes]:
    return {n: png(1, n) for n in (THIN, THINNER)}


def rss_mb(field: str) -> float:
    """This process's VmRSS or VmHWM (peak) in MB; the test's uvicorn server runs in a thread of it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: "5" > /proc/self/clear_refs); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---- the one check ---------------------------------------------------------------------------------------------


def test_check_image_size_bounds_pixels_and_aspect_with_named_reasons():
    check_image_size(4096, 64)  # 64:1 exactly is allowed
    check_image_size(64, 4096)
    with pytest.raises(ImageBoundsError, match=r"image of 1x2097152 has an aspect ratio of 2,097,152:1; the limit "
                                               r"is 64:1: crop it nearer to square") as e:
        check_image_size(1, THIN)
    assert e.value.limit == "aspect" and isinstance(e.value, ValueError)
    with pytest.raises(ImageBoundsError, match=r"image of 65x1 has an aspect ratio of 65:1"):
        check_image_size(65, 1)
    with pytest.raises(ImageBoundsError, match=r"image of 11x10 = 110 pixels; the limit is 100") as e:
        check_image_size(11, 10, max_pixels=100)
    assert e.value.limit == "pixels"
    with pytest.raises(ImageBoundsError, match="aspect"):
        check_image_size(0, 10)
    again = pickle.loads(pickle.dumps(e.value))  # crosses data-loader worker processes intact
    assert str(again) == str(e.value) and again.limit == "pixels"


def test_decode_image_refuses_a_thin_image_from_its_header(thin_pngs):
    start = time.perf_counter()
    with pytest.raises(ImageBoundsError, match="aspect ratio of 16,777,216:1"):
        decode_image(thin_pngs[THINNER])
    assert time.perf_counter() - start < 0.1  # nothing decoded (decoding alone takes longer than this)
    assert read_image({"png": thin_pngs[THIN]}) is None  # stats / export count it as unreadable
    assert decode_image(png(512, 8)).size == (512, 8)


# ---- the eval transform ----------------------------------------------------------------------------------------


def old_eval_transform(img_size: int, in_chans: int) -> v2.Compose:
    """eval_transform as it was before the bound: what trained numbers depend on."""
    mean, std = normalize_stats(in_chans)
    return v2.Compose([
        EnsureMode(in_chans),
        v2.ToImage(),
        v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def noise_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = torch.randint(0, 256, (height, width, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    return Image.fromarray(pixels, mode)


@pytest.mark.parametrize("size", [(28, 28), (32, 48), (300, 200), (8, 512)])
@pytest.mark.parametrize("mode, in_chans, img_size", [("L", 1, 8), ("RGB", 3, 32), ("L", 3, 224)])
def test_eval_transform_is_unchanged_for_normal_images(size, mode, in_chans, img_size):
    image = noise_image(*size, mode, seed=size[0] * 1000 + size[1])
    assert torch.equal(eval_transform(img_size, in_chans)(image), old_eval_transform(img_size, in_chans)(image))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(short=st.integers(1, 40), ratio=st.floats(1.0, MAX_ASPECT), wide=st.booleans())
def test_eval_transform_takes_any_allowed_shape_to_img_size_squared(short, ratio, wide):
    long = min(int(short * ratio), short * MAX_ASPECT)
    image = noise_image(*((long, short) if wide else (short, long)), "L", seed=short)
    out = eval_transform(16, 1)(image)
    assert out.shape == (1, 16, 16) and torch.equal(out, old_eval_transform(16, 1)(image))


def test_eval_transform_refuses_a_thin_image_before_resizing_it():
    image = Image.new("L", (1, THIN))
    start = time.perf_counter()
    with pytest.raises(ImageBoundsError, match="aspect ratio of 2,097,152:1"):
        eval_transform(16, 3)(image)
    assert time.perf_counter() - start < 0.1  # the resize alone made 16 x 33M pixels and took seconds
    with pytest.raises(ImageBoundsError, match="aspect ratio of 65:1"):
        eval_transform(16, 1)(torch.zeros(1, 2, 130, dtype=torch.uint8))  # tensors are checked too


# ---- the service -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index(_digits_shards_once, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bounds")
    backbone = tiny_backbone(root / "backbone")
    build_index(backbone, str(_digits_shards_once / "shard-000000.tar"), root / "digits")
    return {"root": root, "index": root / "digits", "backbone": backbone, "shards": _digits_shards_once}


def test_decode_upload_says_422_for_a_thin_image_and_413_for_too_many_pixels(thin_pngs):
    with pytest.raises(ServeError, match="aspect ratio of 2,097,152:1; the limit is 64:1") as e:
        decode_upload(thin_pngs[THIN])
    assert e.value.status == 422
    with pytest.raises(ServeError, match="the limit is 100") as e:
        decode_upload(png(11, 10), max_pixels=100)
    assert e.value.status == 413


def test_a_thin_upload_to_the_real_server_is_refused_in_milliseconds_without_memory(small_index, thin_pngs):
    app = create_app([small_index["index"]], poll_s=0)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def search(data: bytes) -> httpx.Response:
            return client.post("/search", files={"image": ("x.png", data, "image/png")}, data={"k": "3"})

        assert search(png(8, 8)).status_code == 200  # warm: the first search allocates its buffers
        assert search(png(8, 512)).status_code == 200  # 64:1 is a picture, not an attack
        for n, data in thin_pngs.items():
            assert len(data) < 40_000  # a few KB on the wire
            rss = rss_mb("VmRSS")
            peak_reset = reset_peak_rss()
            start = time.perf_counter()
            r = search(data)
            elapsed = time.perf_counter() - start
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == (f"image of 1x{n} has an aspect ratio of {n:,}:1; the limit is "
                                          f"{MAX_ASPECT}:1: crop it nearer to square")
            assert elapsed < 0.5, f"refusing 1x{n} took {elapsed:.2f} s"  # was ~14 s for 1x2M
            grew = (rss_mb("VmHWM") if peak_reset else rss_mb("VmRSS")) - rss
            assert grew < 50, f"1x{n}: the server's memory grew {grew:.0f} MB"  # was 5.8 GB for 1x2M
        assert search(png(8, 520)).status_code == 422  # 65:1
        assert search(png(8, 8)).status_code == 200  # the index still answers


# ---- shards: the stream, feature extraction and query ----------------------------------------------------------


@pytest.fixture(scope="module")
def shards_with_a_thin_image(small_index, thin_pngs) -> Path:
    """A real WebDataset tar (no manifest: counted by a scan): 200 digits with the 1 x 2M PNG as the 51st."""
    folder = small_index["root"] / "thin-shards"
    folder.mkdir()
    with open_shard(str(small_index["shards"] / "shard-000000.tar")) as f, \
            wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for n, (key, files) in enumerate(iter_tar_samples(f)):
            if n == 50:
                sink.write({"__key__": "thin", "png": thin_pngs[THIN], "cls": b"1"})
            if n == 200:
                break
            sink.write({"__key__": key, **files})
    return folder


def test_the_stream_counts_a_thin_image_as_a_skipped_sample(shards_with_a_thin_image):
    stream = ShardStream(str(shards_with_a_thin_image), batch_size=64, transform=eval_transform(8, 1),
                         mode="exact", shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(stream.loader())
    assert sum(b["skipped"] for b in batches) == 1
    keys = [k for b in batches for k, pad in zip(b["key"], b["pad"]) if not pad]
    assert len(keys) == 200 and "thin" not in keys
    reasons = [str(w.message) for w in caught if issubclass(w.category, StreamWarning)]
    assert len(reasons) == 1 and "sample 'thin'" in reasons[0] and "aspect ratio of 2,097,152:1" in reasons[0]


def test_feature_extraction_and_shard_queries_skip_it_and_count_it(small_index, shards_with_a_thin_image):
    model = load_backbone_from(small_index["backbone"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StreamWarning)
        feats = extract_features(model, str(shards_with_a_thin_image), batch_size=64)
        assert feats.num_skipped == 1 and len(feats.keys) == 200 and "thin" not in feats.keys
        result = query_index(small_index["index"], shards=[str(shards_with_a_thin_image)], k=3)
    assert result.count == 200
    assert result.skipped == [{"input": str(shards_with_a_thin_image),
                               "reason": "1 unreadable samples in the shard set"}]


def test_query_refuses_a_named_thin_image_and_skips_one_in_a_folder(small_index, thin_pngs, tmp_path):
    thin = tmp_path / "queries" / "thin.png"
    thin.parent.mkdir()
    thin.write_bytes(thin_pngs[THIN])
    (tmp_path / "queries" / "digit.png").write_bytes(png(8, 8))
    with pytest.raises(FeatureError, match=rf"query image {thin} is refused: image of 1x2097152 has an aspect "
                                           r"ratio of 2,097,152:1; the limit is 64:1"):
        query_index(small_index["index"], images=[thin], k=3)
    result = query_index(small_index["index"], images=[thin.parent], k=3)
    assert result.count == 1 and result.queries == [str(thin.parent / "digit.png")]
    assert len(result.skipped) == 1 and "aspect ratio of 2,097,152:1" in result.skipped[0]["reason"]


def test_the_writer_skips_and_counts_a_thin_image_file_before_decoding_it(thin_pngs, tmp_path):
    """A crafted file in an image folder never reaches the writer's resize (--size would make it gigabytes)."""
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "a" / "thin.png").write_bytes(thin_pngs[THINNER])
    Image.new("L", (16, 16), 90).save(tmp_path / "photos" / "a" / "fine.png")
    started = time.perf_counter()
    assert shards_main(["write", "folder", str(tmp_path / "photos"), "--out", str(tmp_path / "set"),
                        "--size", "32"]) == 0
    assert time.perf_counter() - started < 5.0
    manifest = load_manifest(tmp_path / "set")
    assert manifest.total == 1 and manifest.skipped == 1
