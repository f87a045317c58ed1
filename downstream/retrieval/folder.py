"""The on-disk form of a retrieval index: a folder of three files, written together (the folder is built under a
temporary name and renamed) and marked as this project's output.

    index.faiss   the vectors (`faiss.write_index`); ids are row numbers 0..N-1
    meta.sqlite   one metadata row per vector (see `downstream.retrieval.metadata`)
    info.json     what the vectors are: checkpoint fingerprint, pooling, dim, normalisation, factory,
                  count, search parameters, checksums of the other two files
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import faiss

from downstream.retrieval.errors import RetrievalError
from downstream.retrieval.metadata import MetadataStore
from downstream.retrieval.vectors import faiss_reason
from shards.atomic import atomic_path, fsync_file
from shards.manifest import sha256_file
from shards.ownership import claim_output, mark_output

FORMAT = "vitssl-retrieval/1"
INDEX_NAME = "index.faiss"
META_NAME = "meta.sqlite"
INFO_NAME = "info.json"
# Keys of info.json that the index computes itself; a caller's `info` may repeat them only with equal values.
COMPUTED_INFO = ("format", "dim", "count", "normalized", "metric", "factory", "faiss_version", "search_params",
                 "tuning", "sha256")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def caller_info(info: Any) -> dict:
    """A JSON copy of the caller's part of info.json, or a `RetrievalError` if it cannot be one."""
    if not isinstance(info, dict):
        raise RetrievalError(f"info must be a dict, got {type(info).__name__}")
    try:
        return _jsonable(info)
    except (TypeError, ValueError) as e:
        raise RetrievalError(f"info must be JSON-serialisable: {e}") from e


def new_info(user_info: dict, *, dim: int, normalize: bool, factory: str) -> dict:
    """info.json of a new, empty index: the caller's keys (`caller_info`) with those the index computes."""
    computed = {"format": FORMAT, "dim": dim, "normalized": bool(normalize), "metric": "inner_product",
                "factory": factory, "faiss_version": faiss.__version__}
    for name, value in user_info.items():
        if name in COMPUTED_INFO and computed.get(name, object()) != value:
            raise RetrievalError(f"info[{name!r}] = {value!r}: the index records {name} itself "
                                 f"({computed.get(name, 'when saved')!r})")
    return {**user_info, **computed, "count": 0, "search_params": {}}


def save_folder(
    folder: Path, index: faiss.Index, store: MetadataStore, info: dict, *, overwrite: bool, loaded_from: Path | None
) -> Path:
    """Write index.faiss, meta.sqlite and info.json (its count and checksums updated in `info`) into `folder`, all
    or nothing. An existing `folder` is replaced only when it is an index this project wrote and `overwrite` is
    given, or is `loaded_from`, the folder the index was loaded from."""
    own = loaded_from is not None and loaded_from.resolve() == folder.resolve()
    claim_output(folder, "index", overwrite=overwrite or own)
    if own:
        store.make_writable()  # the old folder is about to be replaced under the open database
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        mark_output(tmp, "index")
        index_path, meta_path = tmp / INDEX_NAME, tmp / META_NAME
        faiss.write_index(index, str(index_path))
        store.backup_to(meta_path)
        for p in (index_path, meta_path):
            fsync_file(p)
        info["count"] = int(index.ntotal)
        info["sha256"] = {INDEX_NAME: sha256_file(index_path), META_NAME: sha256_file(meta_path)}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True))
        fsync_file(tmp / INFO_NAME)
    return folder


def _read_info(folder: Path, expect: dict | None) -> dict:
    if not folder.is_dir():
        raise RetrievalError(f"no retrieval index folder at {folder}")
    for name in (INFO_NAME, INDEX_NAME, META_NAME):
        if not (folder / name).is_file():
            raise RetrievalError(f"{folder} has no {name}: not a complete retrieval index")
    try:
        info = json.loads((folder / INFO_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RetrievalError(f"{folder / INFO_NAME} is not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise RetrievalError(f"{folder / INFO_NAME}: format {got!r}, this code reads {FORMAT!r}")
    for name, want in _jsonable(expect or {}).items():
        if name not in info:
            raise RetrievalError(f"index at {folder} records no {name!r}; expected {want!r}")
        if info[name] != want:
            raise RetrievalError(f"index at {folder} has {name} = {info[name]!r}, expected {want!r}")
    return info


def _read_faiss(path: Path) -> tuple[faiss.Index | None, str, str | None]:
    """The FAISS index at `path`, read once while hashing the bytes FAISS consumes (and any after them):
    (index, sha256, None), or (None, sha256, why) when FAISS cannot read it, so that a checksum, when there is
    one, names the damage first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            block = f.read(n)
            digest.update(block)
            return block

        try:
            index, error = faiss.read_index(faiss.PyCallbackIOReader(read)), None
        except RuntimeError as e:
            index, error = None, f"{path} is truncated or corrupt; FAISS could not read it ({faiss_reason(e)})"
        while block := f.read(1 << 20):
            digest.update(block)
    return index, digest.hexdigest(), error


def _check_agreement(folder: Path, index: faiss.Index, store: MetadataStore, info: dict) -> None:
    """The vectors, the rows and info.json describe the same index."""
    if index.d != info.get("dim"):
        raise RetrievalError(f"{folder / INDEX_NAME} holds {index.d}-d vectors, info.json says {info.get('dim')}")
    count, lo, hi = store.id_range()
    if count != index.ntotal or (count and (lo, hi) != (0, count - 1)):
        raise RetrievalError(f"{folder}: {index.ntotal} vectors in {INDEX_NAME} but {count} metadata rows "
                             f"(ids {lo}..{hi}) in {META_NAME}")
    if info.get("count") != index.ntotal:
        raise RetrievalError(f"{folder}: info.json count {info.get('count')} but {index.ntotal} vectors")


def read_folder(folder: Path, expect: dict | None, *, verify: bool) -> tuple[faiss.Index, MetadataStore, dict]:
    """The FAISS index, the metadata rows (read-only, in memory) and info.json of a saved index folder; `expect`
    must agree with info.json, and with `verify` the files with its checksums."""
    info = _read_info(folder, expect)
    # Each file is read once, into memory, and checksummed from the very bytes that are loaded: nothing is read
    # from the folder afterwards, so a file damaged or rewritten in place later cannot reach a loaded index.
    digests: dict[str, str] = {}
    index, digests[INDEX_NAME], unreadable = _read_faiss(folder / INDEX_NAME)
    data = (folder / META_NAME).read_bytes()
    digests[META_NAME] = hashlib.sha256(data).hexdigest()
    if verify:
        for name, digest in info.get("sha256", {}).items():
            if digests.get(name, digest) != digest:
                raise RetrievalError(f"{folder / name} does not match the checksum in {INFO_NAME}: "
                                     "truncated or modified since it was saved")
    if index is None:
        raise RetrievalError(unreadable)
    store = MetadataStore.from_bytes(folder / META_NAME, data)
    try:
        _check_agreement(folder, index, store, info)
    except RetrievalError:
        store.close()
        raise
    return index, store, info
