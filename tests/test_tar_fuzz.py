"""Damaged and odd tar shards through every reader: the stream, `verify` and `iter_source_samples` (which `stats`,
`export` and the online evaluator read with) answer with a named error or a counted skip, never a raw
traceback from tarfile, gzip, zlib, Pillow or webdataset, and never a hang.

Real shards are mutated: one written by the project's writer (truncated at any byte, bits flipped, also
gzipped), and tars built with `tarfile` whose members have odd names (no extension, dots, unicode, `..`,
absolute paths, very long names, duplicates) and odd kinds (folders, links). A fixed budget: derandomized
hypothesis, about 70 examples in all, a few seconds."""

from __future__ import annotations

import functools
import gzip
import io
import json
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shards.manifest import MANIFEST_NAME
from shards.sources import RawSample
from shards.stream import ShardStream, StreamError
from shards.tar import ShardReadError, iter_source_samples, iter_tar_samples, open_shard
from shards.verify import verify
from shards.writer import write_shard_set

pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of stalling the suite


def budget(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=1)
def written_set() -> tuple[bytes, str]:
    """(tar bytes, manifest.json text) of a 6-sample set written by the project's writer: L and RGB images,
    labels, captions, metadata."""
    rng = np.random.default_rng(0)
    samples = [
        RawSample(f"{i:08d}", Image.fromarray(rng.integers(0, 256, (6, 5, 3) if i % 2 else (6, 5), np.uint8)),
                  i % 3, f"caption {i}", {"index": i})
        for i in range(6)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set"
        write_shard_set(samples, out, classes=["a", "b", "c"], source="fuzz", samples_per_shard=6)
        return (out / "shard-000000.tar").read_bytes(), (out / MANIFEST_NAME).read_text()


def set_with(folder: Path, data: bytes, name: str = "shard-000000.tar") -> Path:
    """`folder` holding the written set's manifest (renamed to `name`) beside `data` as that shard."""
    folder.mkdir()
    manifest = json.loads(written_set()[1])
    manifest["shards"][0]["name"] = name
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    (folder / name).write_bytes(data)
    return folder


def read_through_everything(folder: Path) -> None:
    """Every reader over `folder`: only named errors may come out, and each says what went wrong."""
    try:
        for _ in iter_source_samples(str(folder)):
            pass
    except ValueError as e:  # ShardReadError names the shard
        assert str(e) and (not isinstance(e, ShardReadError) or str(folder) in str(e)), e
    report = verify(folder)  # never raises: damage is a problem in the report
    assert report.ok or all(p.what for p in report.problems)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skips are counted and warned about; the warnings are not the point here
        try:
            batches = list(ShardStream(str(folder), batch_size=1, shuffle=False))
        except (StreamError, ValueError) as e:  # too much bad data to go on, or nothing to read
            assert str(e)
        else:
            assert all(b["image"].ndim == 4 for b in batches)


def test_the_undamaged_set_reads_cleanly(tmp_path: Path) -> None:
    folder = set_with(tmp_path / "set", written_set()[0])
    assert [k for _, k, _ in iter_source_samples(str(folder))] == [f"{i:08d}" for i in range(6)]
    assert verify(folder).ok
    assert len(list(ShardStream(str(folder), batch_size=1, shuffle=False))) == 6


@budget(20)
@given(cut=st.integers(min_value=0, max_value=len(written_set()[0]) - 1))
def test_truncated_shards_give_named_errors_or_counted_skips(cut: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        read_through_everything(set_with(Path(tmp) / "set", written_set()[0][:cut]))


@budget(25)
@given(flips=st.lists(st.tuples(st.integers(0, len(written_set()[0]) - 1), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips_give_named_errors_or_counted_skips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(written_set()[0])
    for offset, bit in flips:
        data[offset] ^= 1 << bit
    with tempfile.TemporaryDirectory() as tmp:
        read_through_everything(set_with(Path(tmp) / "set", bytes(data)))


@budget(10)
@given(offset=st.integers(0, 400), cut=st.booleans())
def test_damaged_gzipped_shards_give_named_errors(offset: int, cut: bool) -> None:
    packed = bytearray(gzip.compress(written_set()[0], mtime=0))
    offset %= len(packed)
    packed = packed[:offset] if cut else packed[:offset] + bytes([packed[offset] ^ 0x5A]) + packed[offset + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        read_through_everything(set_with(Path(tmp) / "set", bytes(packed), "shard-000000.tar.gz"))


def test_a_corrupt_gzip_stream_is_a_shard_read_error(tmp_path: Path) -> None:
    """zlib.error is neither an OSError nor a ValueError: it used to escape every reader's except clause."""
    packed = bytearray(gzip.compress(written_set()[0], mtime=0))
    packed[10] = 0b111  # the first deflate block after the 10-byte gzip header: final, of the reserved type 3
    path = tmp_path / "x.tar.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(ShardReadError, match="corrupt tar or compressed data"), open_shard(str(path)) as f:
        list(iter_tar_samples(f))


def with_checksum(header: bytes) -> bytes:
    """A tar header block with its checksum field recomputed (the byte sum, the field counted as spaces)."""
    total = sum(header[:148]) + 8 * ord(" ") + sum(header[156:512])
    return header[:148] + b"%06o\0 " % total + header[156:]


@pytest.mark.parametrize("damage, why", [
    (lambda h: h[:124] + b"-0000000777\0" + h[136:], "negative member size"),  # int() takes a sign
    (lambda h: h[:124] + b"\x80" + b"\xff" * 11 + h[136:], "truncated member"),  # a base-256 size of ~2**88
])
def test_damaged_size_fields_are_named_without_allocating_the_size(tmp_path: Path, damage, why: str) -> None:
    data = written_set()[0]
    header = with_checksum(damage(data[:512]))  # a header that passes its checksum: only the size is wrong
    path = tmp_path / "x.tar"
    path.write_bytes(header + data[512:])
    with pytest.raises(ShardReadError, match=why), open_shard(str(path)) as f:
        list(iter_tar_samples(f))


def test_a_pax_record_of_length_zero_is_an_error_not_an_endless_loop(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k\u00e9y.png")  # non-ASCII: tarfile writes a pax header for it
        tar.addfile(info, io.BytesIO(b""))
    data = bytearray(buf.getvalue())
    record = data.index(b" path=")
    start = data.rindex(b"\0", 0, record) + 1  # the record's decimal length, right after the header block
    data[start:record] = b"0" * (record - start)
    path = tmp_path / "x.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match="pax"), open_shard(str(path)) as f:
        list(iter_tar_samples(f))


ODD_NAMES = ["k", "k.", ".png", ".hidden.png", "..", "../up.png", "/abs/k.png", "a.b.c.png", "k.PNG", "d/",
             "\u00fcn\u00efcode.png", "\u0441\u043b\u043e\u0432\u043e.cls", "x" * 300 + ".png", "__key__",
             "__meta__", "k.cls", "k.png", "k.png", "dir/k.png", "k.txt", "sp ace.json"]
PAYLOADS = [b"", b"7", b"\xff\xfe", b'{"a": 1}', b"not an image"]
KINDS = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]


@functools.lru_cache(maxsize=1)
def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5, 6), 77).save(buf, format="PNG")
    return buf.getvalue()


member = st.tuples(
    st.one_of(st.sampled_from(ODD_NAMES), st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s)),
    st.one_of(st.sampled_from(PAYLOADS), st.just(b"png")),
    st.sampled_from(KINDS),
)


@budget(20)
@given(members=st.lists(member, min_size=0, max_size=8), gnu=st.booleans())
def test_odd_member_names_read_without_errors(members: list[tuple[str, bytes, bytes]], gnu: bool) -> None:
    """A well-formed tar never fails to read, however odd its names: odd members are ignored or counted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT if gnu else tarfile.PAX_FORMAT) as tar:
        for name, payload, kind in members:
            payload = png_bytes() if payload == b"png" else payload
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            info.linkname = "k.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "foreign"  # no manifest: another tool's set, counted by a scan
        folder.mkdir()
        (folder / "00000.tar").write_bytes(buf.getvalue())
        regular = [n for n, _, k in members if k == tarfile.REGTYPE]
        samples = list(iter_source_samples(str(folder)))  # a valid tar: no error at all
        assert len(samples) <= len(regular)
        read_through_everything(folder)
