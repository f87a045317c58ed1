"""Tar shards: the one reader of tar files in the house, and the resolving of a shard source into tars.

- `iter_tar_members` / `iter_tar_samples`: a small streaming parser (ustar, GNU long names, pax; gzip by
  ``.gz``/``.tgz`` suffix), faster than `tarfile` on small samples (bench/README.md), grouping members into
  samples the WebDataset way. The stream, `verify`, `info`, `stats`, `export`, the online evaluator and the
  retrieval layer all read tars through it, so they agree on what a sample is.
- `open_shard`: the one opener of shards. Local paths and ``file://`` are opened as plain files (`open`),
  ``http(s)://`` with urllib (retries and back-off; a URL that cannot be read raises `StreamError` naming it).
  Anything that would run a program is refused (`PipeSourceError`) unless allowed, ``allow_pipe=True`` or
  ``VITSSL_ALLOW_PIPE=1`` (`check_pipe_allowed`): ``pipe:`` URLs (a shell command) and the other schemes
  webdataset opens by running a tool (``gs://``, ``hf://``, ``sftp://``, ...). webdataset's ``GOPEN_REWRITE``
  is never applied (it could turn a path into a ``pipe:`` command): a source it would rewrite is refused.
- `tar_writer`: a `webdataset.TarWriter` on a plain local file, for every writer of tars (given a path, TarWriter
  opens it through `gopen`, where ``GOPEN_REWRITE`` could turn the write into a shell command).
- `list_shards`: a folder (its manifest's order and counts), tar paths, globs, brace patterns, URLs or a
  comma-separated mix, as [(url, sample count)].
"""

from __future__ import annotations

import glob
import gzip
import http.client
import io
import os
import re
import struct
import tarfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import braceexpand
from webdataset.gopen import gopen_schemes, rewrite_url
from webdataset.writer import TarWriter

from shards.manifest import MANIFEST_NAME, Manifest, load_manifest

_ZERO_BLOCK = bytes(512)
_GLOB_CHARS = re.compile(r"[*?\[]")
ALLOW_PIPE_ENV = "VITSSL_ALLOW_PIPE"  # "1" allows pipe: (and other program-running) sources everywhere (for CLIs)
REWRITE_ENV = "GOPEN_REWRITE"  # webdataset's URL rewriting: never applied here, a source it would change is refused
PLAIN_SCHEMES = ("", "file", "http", "https")  # opened by this module itself: no program runs
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class StreamError(RuntimeError):
    """Too much of the data could not be read to go on."""


class ShardReadError(tarfile.ReadError, ValueError):
    """A shard that cannot be read through: truncated, corrupt, or not a tar. A `tarfile.ReadError` (what
    readers of tars catch) and a ValueError (what the CLIs report as one line)."""


class StreamWarning(UserWarning):
    """A shard or sample that was skipped (and counted)."""


class PipeSourceError(ValueError):
    """A shard source that was refused: opening it would run a program (a ``pipe:`` URL, a scheme webdataset
    opens with an external tool) without permission, or webdataset's ``GOPEN_REWRITE`` would rewrite it."""


def source_scheme(url: str) -> str:
    """The scheme of a shard source, lower case: "pipe", "http", "gs", ...; "" for a local path."""
    stripped = url.lstrip()
    if stripped[:5].lower() == "pipe:":
        return "pipe"
    match = _SCHEME.match(stripped)
    return match.group(1).lower() if match else ""


def _check_no_rewrite(url: str) -> None:
    """Refuse `url` when ``GOPEN_REWRITE`` would rewrite it: the rewrite runs after every check (inside
    `webdataset.gopen`) and can turn a local path into ``pipe:`` a shell command, so it is never applied here."""
    if REWRITE_ENV not in os.environ:
        return
    try:
        rewritten = rewrite_url(url)
    except (ValueError, re.error) as e:  # a malformed rule, or webdataset's own security mode
        rewritten = f"<cannot apply: {e}>"
    if rewritten != url:
        raise PipeSourceError(
            f"shard source {url!r} would be rewritten by {REWRITE_ENV}={os.environ[REWRITE_ENV]!r} to {rewritten!r}; "
            f"refused: this project never applies webdataset's URL rewrites (one can turn a path into a shell "
            f"command). Unset {REWRITE_ENV} and give the source you mean directly"
        )


def check_pipe_allowed(url: str, allow_pipe: bool = False) -> None:
    """The one guard every opening and listing passes through: refuse (`PipeSourceError`) a source that
    ``GOPEN_REWRITE`` would rewrite (`_check_no_rewrite`), a scheme nothing here can open, and, unless
    `allow_pipe` or ``VITSSL_ALLOW_PIPE=1``, one whose opening runs a program: ``pipe:`` hands the rest of
    the URL to a shell, and webdataset opens ``gs://``, ``hf://``, ``sftp://``, ... by running a tool, so a
    source string from a recipe or a command line could run anything."""
    _check_no_rewrite(url)
    scheme = source_scheme(url)
    if scheme in PLAIN_SCHEMES:
        return
    if scheme not in gopen_schemes:
        raise PipeSourceError(
            f"shard source {url!r} has the scheme {scheme}://, which cannot be opened: use a local path, "
            f"file://, http(s)://, or (allowed) pipe: a command that writes the tar to stdout"
        )
    if allow_pipe or os.environ.get(ALLOW_PIPE_ENV, "").strip() == "1":
        return
    what = "is a pipe: URL, which runs a shell command" if scheme == "pipe" else (
        f"has the scheme {scheme}://, which webdataset opens by running an external program")
    raise PipeSourceError(
        f"shard source {url!r} {what}; refused. If you trust it, allow it "
        f"with allow_pipe=True (recipe: data.allow_pipe: true) or the environment variable {ALLOW_PIPE_ENV}=1"
    )


# ---------------------------------------------------------------------------------------------------------
# Tar reading


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0  # a ValueError on damage: `iter_tar_members` names it


def _checksum_ok(hdr: bytes) -> bool:
    field = hdr[148:156]
    stored = _octal(field)
    # The unsigned byte sum, with the checksum field counted as 8 spaces. Adler-32's low half is
    # 1 + (byte sum mod 65521), computed in C: sum(hdr) in Python dominated the parse (bench/README.md).
    if (zlib.adler32(hdr) & 0xFFFF) - 1 - sum(field) + 256 - stored in (0, -65521):
        return True
    signed = sum(struct.unpack("148b", hdr[:148])) + 256 + sum(struct.unpack("356b", hdr[156:]))
    return stored == signed


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    out, i = {}, 0
    while i < len(data):
        space = data.find(b" ", i)
        length = data[i:space]
        if space < 0 or not length.isdigit() or not space < i + int(length) <= len(data):
            raise ShardReadError(f"bad pax record at byte {i} of an extended header")  # and no endless loop
        key, _, value = data[space + 1 : i + int(length) - 1].partition(b"=")
        out[key] = value
        i += int(length)
    return out


_READ_CHUNK = 1 << 24  # members larger than this are read in pieces: a damaged size field must not allocate GiBs


def _read_big(read, size: int) -> bytes:
    """Up to `size` bytes (fewer at the end of the stream), without asking the stream for more than
    `_READ_CHUNK` at once."""
    parts, left = [], size
    while left and (part := read(min(left, _READ_CHUNK))):
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Regular files of a tar stream, in order, as (name, data).

    Raises `ShardReadError` (a `tarfile.ReadError`) on a truncated or corrupt archive, whatever the damage
    (including one that ends without the end-of-archive blocks, or gzip data that does not decompress), after
    yielding the members before it; other I/O errors (a dropped connection) come through as they are.
    """
    try:
        yield from _members(stream)
    except tarfile.ReadError:
        raise
    except (ValueError, OverflowError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ShardReadError(f"corrupt tar or compressed data ({type(e).__name__}: {e})") from e


def _members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    read = stream.read
    offset = 0
    long_name: str | None = None
    pax_size: int | None = None
    while True:
        hdr = read(512)
        if len(hdr) < 512:
            raise ShardReadError(
                "ends without the end-of-archive marker (truncated?)"
                if not hdr
                else f"truncated header at byte {offset}"
            )
        if hdr == _ZERO_BLOCK:
            return  # end-of-archive; what follows is padding
        if not _checksum_ok(hdr):
            raise ShardReadError(f"bad header checksum at byte {offset} (corrupt or not a tar)")
        size = _octal(hdr[124:136]) if pax_size is None else pax_size
        kind = hdr[156:157]
        if size < 0:  # int() takes a sign
            raise ShardReadError(f"negative member size {size} at byte {offset}")
        data = read(size) if size <= _READ_CHUNK else _read_big(read, size)
        if len(data) < size:
            raise ShardReadError(f"truncated member at byte {offset}: {len(data)} of {size} bytes")
        padding = -size % 512
        if padding and len(read(padding)) < padding:
            raise ShardReadError(f"truncated padding at byte {offset + 512 + size}")
        offset += 512 + size + padding
        if kind == b"x":  # pax extended header for the next member
            records = _pax_records(data)
            if b"path" in records:
                long_name = records[b"path"].decode("utf-8", "replace")
            if b"size" in records:
                if not records[b"size"].isdigit():
                    raise ShardReadError(f"bad pax size {records[b'size'][:20]!r} at byte {offset}")
                pax_size = int(records[b"size"])
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name = long_name
            else:
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if hdr[257:265] == b"ustar\x0000":
                    prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                    if prefix:
                        name = f"{prefix}/{name}"
            yield name, data
        long_name, pax_size = None, None  # "g", "K", directories, links: nothing to yield


def split_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """(key, extension) of a tar member name: `webdataset.tariterators.base_plus_ext` without its regex
    (a third of the parse time): the key ends at the first dot of the file name. Unlike the regex, a
    file name starting with a dot (a hidden file) is ignored."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot <= base:  # no dot, or the file name starts with one
        return None, None
    return name[:dot], name[dot + 1 :]


def iter_tar_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a tar stream as (key, {extension: bytes}), grouped the WebDataset way.

    Files sharing a key (`split_key`) and adjacent in the tar form one sample; `__meta__` files and
    names without an extension are ignored. A sample interrupted by a read error is not yielded. A
    sample with a repeated extension carries `"__bad__"`.
    """
    key: str | None = None
    files: dict[str, bytes] = {}
    for name, data in iter_tar_members(stream):
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        prefix, ext = split_key(name)
        if prefix is None:
            continue
        ext = ext.lower()
        if prefix != key:
            if key is not None:
                yield key, files
            key, files = prefix, {}
        if ext in files:
            files["__bad__"] = f"repeated file {name}".encode()
        files[ext] = data
    if key is not None:
        yield key, files


# HTTP(S) shards: attempts and the first back-off delay (doubling) for transient failures: refused or reset
# connections, timeouts, 408/429/5xx. Other 4xx (a missing shard) fail at once.
HTTP_ATTEMPTS, HTTP_BACKOFF_S, HTTP_TIMEOUT_S = 5, 0.5, 60.0
_HTTP_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _HTTPStream(io.RawIOBase):
    """A streamed HTTP response whose failures are `OSError`s naming the URL (`http.client` raises
    `IncompleteRead`, not an OSError, when a connection drops mid-body)."""

    def __init__(self, response, url: str) -> None:
        self._response, self.url = response, url

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._response.read(n if n is not None and n >= 0 else None)
        except (http.client.HTTPException, OSError) as e:
            raise OSError(f"{self.url}: connection failed mid-read ({type(e).__name__}: {e})") from e

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._response.close()
        super().close()


def _open_http(url: str) -> BinaryIO:
    """GET `url` as a stream, retrying transient failures with exponential back-off; `StreamError` naming the
    URL when it cannot be had (retries exhausted, or a 4xx such as 404)."""
    last = ""
    for attempt in range(HTTP_ATTEMPTS):
        if attempt:
            time.sleep(HTTP_BACKOFF_S * 2 ** (attempt - 1))
        try:
            response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
            return io.BufferedReader(_HTTPStream(response, url), buffer_size=1 << 20)  # full-size reads
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code not in _HTTP_RETRY_STATUS:
                raise StreamError(f"cannot read shard {url}: {last}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise StreamError(f"cannot read shard {url}: {last} (after {HTTP_ATTEMPTS} attempts)")


def open_shard(url: str, *, allow_pipe: bool = False) -> BinaryIO:
    """Open a shard for reading, once `check_pipe_allowed` passes it: a local path or file:// as a plain file,
    http(s):// with retries (`_open_http`), an allowed pipe: or other tool scheme with webdataset's handler for
    that scheme, called directly (not `gopen`, which would apply ``GOPEN_REWRITE`` after the check)."""
    check_pipe_allowed(url, allow_pipe)
    scheme = source_scheme(url)
    if scheme in ("http", "https"):
        stream = _open_http(url)
    elif scheme in ("", "file"):
        stream = open(url[len("file://") :] if scheme else url, "rb")  # noqa: SIM115 (the caller closes it)
    else:
        stream = gopen_schemes[scheme](url.lstrip(), "rb", 8192)
    return gzip.GzipFile(fileobj=stream) if url.endswith((".gz", ".tgz")) else stream


def tar_writer(path: str | os.PathLike, **options) -> TarWriter:
    """A `webdataset.TarWriter` (`options` are its own) writing the local file `path`, opened here as a plain
    file: given a path string, TarWriter opens it with `gopen`, which applies ``GOPEN_REWRITE``, so a rewrite rule
    could turn writing a shard into a shell command. Closing the writer closes the file, as it would its own."""
    compressed = next((c for c in ("gz", "bz2", "xz") if os.fspath(path).endswith(c)), None)
    options.setdefault("compress", compressed)  # TarWriter picks the compression from a path's suffix
    stream = open(path, "wb")  # noqa: SIM115 (owned, and closed, by the writer)
    try:
        writer = TarWriter(stream, **options)
    except BaseException:
        stream.close()
        raise
    writer.own_fileobj = stream
    return writer


# ---------------------------------------------------------------------------------------------------------
# Resolving a source into shards with counts

_scan_cache: dict[tuple, int] = {}
_manifest_cache: dict[tuple, dict[str, int]] = {}


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def count_tar_samples(url: str, *, allow_pipe: bool = False) -> int:
    """Samples in one tar, by reading it through (cached per process); a damaged tar counts what is readable.
    A ``pipe:`` URL is refused unless allowed (`check_pipe_allowed`)."""
    check_pipe_allowed(url, allow_pipe)
    key: tuple = (url,)
    if not _is_url(url):
        st = os.stat(url)
        key = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
    if key not in _scan_cache:
        n = 0
        try:
            with open_shard(url, allow_pipe=allow_pipe) as stream:
                for _ in iter_tar_samples(stream):
                    n += 1
        except (tarfile.ReadError, OSError, EOFError) as e:
            if n == 0 and _is_url(url) and not isinstance(e, tarfile.ReadError):
                # A URL that delivers nothing (a failed `pipe:` command, a dead server) is an error, not an
                # empty shard to skip quietly.
                raise StreamError(f"cannot read shard {url}: {e}") from e
            warnings.warn(
                f"{url}: unreadable after {n} samples ({e}); counting {n}", StreamWarning, stacklevel=2
            )
        _scan_cache[key] = n
    return _scan_cache[key]


def _manifest_counts(folder: Path) -> dict[str, int]:
    """{shard file name: count} from `folder/manifest.json`, or {} when there is none; a manifest naming a
    file outside `folder` is refused (`load_manifest`)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _manifest_cache:
        _manifest_cache[key] = {s.name: s.count for s in load_manifest(folder).shards}
    return _manifest_cache[key]


def _split_top_level_commas(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def list_shards(
    source: str | os.PathLike | Sequence[str | os.PathLike], *, allow_pipe: bool = False
) -> list[tuple[str, int]]:
    """Resolve a source into [(url, sample count)] in canonical order.

    `source`: a shard-set folder (its manifest's order and counts; a folder without a manifest means its
    `*.tar` files, sorted, counted by a scan), a list of paths/URLs, a glob, a brace pattern
    (`shard-{000000..000009}.tar`) or a comma-separated mix of these. Local tars listed in a
    `manifest.json` beside them take their count from it; other tars are counted by one scan.
    A ``pipe:`` item is refused unless `allow_pipe` or ``VITSSL_ALLOW_PIPE=1`` (`check_pipe_allowed`);
    a manifest entry outside its folder is refused (`shards.manifest.ManifestEntryError`).
    """
    items: list[str]
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        items = [s] if s.startswith("pipe:") or os.path.isdir(s) else _split_top_level_commas(s)
    else:
        items = [os.fspath(x) for x in source]
    if not items:
        raise ValueError(
            "empty shard source: give a shard-set folder, tar paths/URLs, a glob or a brace pattern"
        )
    out: list[tuple[str, int]] = []
    for item in items:
        if item.startswith("file://"):
            item = item[len("file://") :]
        check_pipe_allowed(item, allow_pipe)  # before anything runs, even a count
        if _is_url(item):
            urls = [item] if item.startswith("pipe:") else list(braceexpand.braceexpand(item))
            out.extend((u, count_tar_samples(u, allow_pipe=allow_pipe)) for u in urls)
            continue
        if os.path.isdir(item):
            out.extend(_folder_shards(Path(item)))
            continue
        for path in braceexpand.braceexpand(item):
            if _GLOB_CHARS.search(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no files match the glob {path!r} (from source {item!r})")
            else:
                if not os.path.isfile(path):
                    origin = f" (from source {item!r})" if path != item else ""
                    raise FileNotFoundError(f"shard not found: {path}{origin}")
                matches = [path]
            for m in matches:
                known = _manifest_counts(Path(m).parent)
                name = Path(m).name
                out.append((m, known[name] if name in known else count_tar_samples(m)))
    return out


def _folder_shards(folder: Path) -> list[tuple[str, int]]:
    if (folder / MANIFEST_NAME).is_file():
        manifest = load_manifest(folder)  # refuses entries outside `folder`
        missing = [s.name for s in manifest.shards if not (folder / s.name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder / MANIFEST_NAME} lists shards that are missing: {missing[:5]}")
        return [(str(folder / s.name), s.count) for s in manifest.shards]
    tars = sorted(str(p) for p in folder.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
    if not tars:
        raise FileNotFoundError(f"{folder} holds neither {MANIFEST_NAME} nor any .tar shard")
    return [(t, count_tar_samples(t)) for t in tars]


def iter_source_samples(
    source: str | os.PathLike, *, allow_pipe: bool = False, per_shard: int = 0
) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """(shard url, key, files) for every sample of a source, shard after shard in `list_shards` order; with
    `per_shard` > 0, only the first that many of each shard. A damaged shard raises `ShardReadError` naming it,
    after the samples before the damage."""
    for url, _count in list_shards(source, allow_pipe=allow_pipe):
        done = 0
        try:
            with open_shard(url, allow_pipe=allow_pipe) as stream:
                for i, (key, files) in enumerate(iter_tar_samples(stream)):
                    if per_shard and i >= per_shard:
                        break
                    done = i + 1
                    yield url, key, files
        except tarfile.ReadError as e:
            raise ShardReadError(f"shard {url} is unreadable after {done} samples: {e}") from e


def manifest_for(source: str | os.PathLike) -> Manifest | None:
    """The manifest describing a shard source: a folder's own, else that of the folder holding its first listed
    shard (a glob or brace pattern inside one set); None when there is none (another tool's shards, a source that
    does not exist). The one
    place class names and captions-or-not are read from (features, fine-tuning, CLIP, the index)."""
    folder = Path(source)
    if not folder.is_dir() and not _is_url(str(source)):
        try:
            shards = list_shards(str(source))
        except (OSError, ValueError):  # missing or unlistable: whoever reads the shards says so
            return None
        folder = Path(shards[0][0]).parent if shards else folder
    if folder.is_dir() and (folder / MANIFEST_NAME).is_file():
        return load_manifest(folder)
    return None


def manifest_class_names(source: str | os.PathLike) -> list[str]:
    """The class names of `manifest_for(source)`; [] without one."""
    manifest = manifest_for(source)
    return list(manifest.classes) if manifest else []
