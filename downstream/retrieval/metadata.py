"""The metadata of a retrieval index: one SQLite row per vector, its id the vector's row number.

Columns: id, key, shard, label, label_name, caption, source (the sample's source name: file path relative to the
source root, or a table's row id), meta (the sample's .json, as JSON text), thumbnail (PNG bytes). An index saved
before source names lacks source and meta: they read as None, and the first change gives the table those columns.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from downstream.retrieval.errors import RetrievalError
from shards.sources import source_stem

ROW_FIELDS = ("key", "shard", "label", "label_name", "caption", "source", "meta", "thumbnail")
_TEXT_FIELDS = ("shard", "label_name", "caption", "source")
_ADDED_COLUMNS = {"source": "TEXT", "meta": "TEXT"}  # columns that indexes saved before source names lack
# What `index eval --relevant field:NAME` may name besides the fields of each sample's .json (`row_field`).
DERIVED_FIELDS = ("source_stem",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_SCHEMA = """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    shard TEXT,
    label INTEGER,
    label_name TEXT,
    caption TEXT,
    thumbnail BLOB,
    source TEXT,
    meta TEXT
)
"""
_INSERT = ("INSERT INTO meta (id, key, shard, label, label_name, caption, thumbnail, source, meta) "
           f"VALUES ({', '.join('?' * 9)})")
_SQL_CHUNK = 900  # stays under SQLite's host-parameter limit on old builds (999)


def clean_row(row: dict, n: int) -> tuple:
    """A metadata row (id `n`) checked field by field, as the values of `_INSERT` after the id."""
    if not isinstance(row, dict):
        raise RetrievalError(f"row {n} must be a dict with fields {', '.join(ROW_FIELDS)}, got {type(row).__name__}")
    unknown = set(row) - set(ROW_FIELDS)
    if unknown:
        raise RetrievalError(f"row {n} has unknown field(s) {sorted(unknown)}; valid: {', '.join(ROW_FIELDS)}")
    key = row.get("key")
    if not isinstance(key, str) or not key:
        raise RetrievalError(f"row {n} needs a non-empty string 'key', got {key!r}")
    label = row.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise RetrievalError(f"row {n} ({key}): label must be an int or None, got {label!r}")
        label = int(label)
    thumb = row.get("thumbnail")
    if thumb is not None:
        if not isinstance(thumb, (bytes, bytearray, memoryview)) or not bytes(thumb[:8]) == PNG_SIGNATURE:
            raise RetrievalError(f"row {n} ({key}): thumbnail must be PNG bytes "
                                 "(see downstream.contact_sheet.thumbnail_png)")
        thumb = bytes(thumb)
    texts = []
    for name in _TEXT_FIELDS:
        v = row.get(name)
        if v is not None and not isinstance(v, str):
            raise RetrievalError(f"row {n} ({key}): {name} must be a string or None, got {type(v).__name__}")
        texts.append(v)
    meta = row.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise RetrievalError(f"row {n} ({key}): meta must be a dict (the sample's .json) or None, "
                                 f"got {type(meta).__name__}")
        try:
            meta = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise RetrievalError(f"row {n} ({key}): meta is not JSON-serialisable ({e})") from e
    return key, texts[0], label, texts[1], texts[2], thumb, texts[3], meta


def _parse_meta(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


def comparable(value: Any) -> Any:
    """A hashable stand-in for a metadata value, equal exactly when the values are: strings and ints stay as
    they are, anything else (float, bool, list, object) becomes its canonical JSON; None stays None (no value)."""
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    return json.dumps(value, sort_keys=True)


def row_field(row: dict, name: str) -> Any:
    """The value of field `name` for a metadata row (`rows_for`, `downstream.search.metadata_rows`):
    one of its columns (key, shard, label, label_name, caption, source), `source_stem` (the source's file name
    without its image extension), or else the field `name` of the sample's .json (`row["meta"]`); None when
    absent. Comparable with `==` (see `comparable`)."""
    if name == "source_stem":
        return source_stem(row.get("source"))
    if name in ROW_FIELDS and name not in ("meta", "thumbnail"):
        return comparable(row.get(name))
    meta = row.get("meta")
    return comparable(meta.get(name)) if isinstance(meta, dict) else None


class MetadataStore:
    """The metadata rows in an in-memory SQLite database: new and writable (`empty`), or a saved meta.sqlite's
    bytes, read-only until the first change copies them into a writable database (`from_bytes`)."""

    def __init__(self, db: sqlite3.Connection, *, path: Path | None = None, read_only: bool = False):
        self._db = db
        self._path = path  # the meta.sqlite the rows were read from, for messages
        self._read_only = read_only
        self._column_names: set[str] | None = None  # read on first use: a loaded file is checked before then
        self._labels: np.ndarray | None = None

    @classmethod
    def empty(cls) -> MetadataStore:
        db = sqlite3.connect(":memory:")
        db.execute(_SCHEMA)
        return cls(db)

    @classmethod
    def from_bytes(cls, path: Path, data: bytes) -> MetadataStore:
        """The metadata database read from `path` (`data`, its bytes), read-only until `make_writable`."""
        db = sqlite3.connect(":memory:")
        try:
            db.deserialize(data)
            db.execute("PRAGMA query_only = ON")
        except sqlite3.DatabaseError as e:
            db.close()
            raise RetrievalError(f"{path} is not a readable metadata database: {e}") from e
        return cls(db, path=path, read_only=True)

    @property
    def _columns(self) -> set[str]:
        if self._column_names is None:
            self._column_names = {rec[1] for rec in self._db.execute("PRAGMA table_info(meta)")}
        return self._column_names

    def id_range(self) -> tuple[int, int | None, int | None]:
        """(rows, smallest id, largest id) of a database read from a file, or a `RetrievalError` if unreadable."""
        try:
            return self._db.execute("SELECT count(*), min(id), max(id) FROM meta").fetchone()
        except sqlite3.DatabaseError as e:
            raise RetrievalError(f"{self._path} is not a readable metadata database: {e}") from e

    def close(self) -> None:
        self._db.close()

    def backup_to(self, path: Path) -> None:
        """Write the rows to a new SQLite file at `path`."""
        dst = sqlite3.connect(path)
        try:
            self._db.backup(dst)
        finally:
            dst.close()

    # ---- changes --------------------------------------------------------------------------------------

    def make_writable(self) -> None:
        """Copy read-only rows into a writable database and give an index saved before source names their
        columns; nothing to do for a store that has changed before."""
        if self._read_only:
            mem = sqlite3.connect(":memory:")
            self._db.backup(mem)
            self._db.close()
            self._db = mem
            self._read_only = False
        for name, kind in _ADDED_COLUMNS.items():
            if name not in self._columns:
                self._db.execute(f"ALTER TABLE meta ADD COLUMN {name} {kind}")
                self._columns.add(name)

    def insert(self, records: Sequence[tuple], also: Callable[[], None]) -> None:
        """Insert `records` (id, *`clean_row`) and run `also` (adding their vectors) in one transaction: rolled
        back if a key repeats or `also` raises."""
        self.make_writable()
        with self._db:
            try:
                self._db.executemany(_INSERT, records)
            except sqlite3.IntegrityError as e:
                raise RetrievalError(f"duplicate key among the new rows or already indexed: {e}") from e
            also()
        self._labels = None

    # ---- reads ----------------------------------------------------------------------------------------

    def lookup_key(self, key: str) -> int:
        row = self._db.execute("SELECT id FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(f"no indexed item with key {key!r}")
        return int(row[0])

    def rows_for(self, ids: Sequence[int] | np.ndarray, *, thumbnails: bool = True) -> list:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim not in (1, 2):
            raise RetrievalError(f"ids must be 1-D or 2-D, got shape {arr.shape}")
        cols = ("id",) + ROW_FIELDS if thumbnails else ("id",) + ROW_FIELDS[:-1]
        select = ", ".join(c if c in self._columns or c == "id" else f"NULL AS {c}" for c in cols)
        wanted = [int(i) for i in np.unique(arr) if i >= 0]
        found: dict[int, dict] = {}
        for lo in range(0, len(wanted), _SQL_CHUNK):
            chunk = wanted[lo:lo + _SQL_CHUNK]
            sql = f"SELECT {select} FROM meta WHERE id IN ({','.join('?' * len(chunk))})"
            for rec in self._db.execute(sql, chunk):
                row = dict(zip(cols, rec))
                row["meta"] = _parse_meta(row["meta"])
                found[rec[0]] = row
        missing = [i for i in wanted if i not in found]
        if missing:
            raise RetrievalError(f"id {missing[0]} has no metadata row")
        if arr.ndim == 1:
            return [found.get(int(i)) for i in arr]
        return [[found.get(int(i)) for i in line] for line in arr]

    def labels(self, n: int) -> np.ndarray:
        """The labels of rows 0..n-1, indexed by id; -1 where unlabelled."""
        if self._labels is None:
            out = np.full(n, -1, dtype=np.int64)
            for i, label in self._db.execute("SELECT id, label FROM meta WHERE label IS NOT NULL"):
                out[i] = label
            self._labels = out
        return self._labels

    def field_values(self, name: str, n: int) -> list:
        """The values of field `name` (see `row_field`) of rows 0..n-1, indexed by id; None where absent."""
        column = "source" if name == "source_stem" else name
        if column not in ROW_FIELDS or column in ("meta", "thumbnail"):
            column = "meta"
        if column not in self._columns:  # an index saved before source names
            return [None] * n
        values: list = [None] * n
        for i, value in self._db.execute(f"SELECT id, {column} FROM meta"):
            values[i] = row_field({column: _parse_meta(value) if column == "meta" else value}, name)
        return values
