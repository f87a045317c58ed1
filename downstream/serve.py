"""Serving retrieval indexes: one loaded snapshot per index folder, queries batched, folders watched.

A `Snapshot` is one loaded version of an index folder: its `RetrievalIndex`, the `Embedder` that made it, a
generation number, and the one worker thread that owns both. One thread because SQLite connections belong to
the thread that opened them, and because it batches for free: the queries that arrive while a batch is being
embedded all go into the next one (one forward pass, one FAISS search).

`IndexService` holds the current snapshot behind one reference. A request takes it once (`IndexService.use`)
and asks it everything, so it sees the old version or the new one, never a mix. A reload (a poll of the folder
noticing that `index add` or a rebuild replaced it, or a file changed in place, or an explicit `reload()`) loads
the new version beside the old one and swaps the reference; the old snapshot's worker answers whatever its last
users ask, then stops. A snapshot holds what it loaded in memory, checksummed against info.json (the vectors and
the metadata database alike), so a file damaged on disk later never reaches a request: the load of the damaged
version fails, and the last good one goes on answering while `IndexService.problem` says why.

The HTTP face is `downstream.serve_app`; this module knows nothing of HTTP beyond the status in `ServeError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from downstream.retrieval import INDEX_NAME, INFO_NAME, META_NAME, RetrievalError, RetrievalIndex
from downstream.search import HIT_FIELDS, open_index

log = logging.getLogger(__name__)

MAX_K = 100
MAX_BATCH = 64  # queries embedded together at most; more wait for the next batch
MAX_TEXT = 1000  # characters: a text query is a caption, and a huge one would hold the worker up tokenising it


class ServeError(Exception):
    """A request the service cannot answer; `status` is the HTTP status that says why (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    """One search: exactly one of an image, a text (CLIP-space indexes) or an indexed key (which never finds
    itself), the number of hits, and optionally the label every hit must have."""

    image: Image.Image | None = None
    text: str | None = None
    key: str | None = None
    k: int = 10
    label: int | None = None

    @property
    def kind(self) -> str:
        return "image" if self.image is not None else "text" if self.text is not None else "key"


def folder_stamp(folder: Path) -> tuple | None:
    """What changes whenever the folder or one of its files is rewritten: `RetrievalIndex.save` replaces the
    whole folder (a new inode); a file changed in place (truncated, overwritten) changes its size or mtime. None
    while the folder or a file is missing (mid-replace)."""
    try:
        d = os.stat(folder)
        files = [os.stat(folder / name) for name in (INFO_NAME, INDEX_NAME, META_NAME)]
    except FileNotFoundError:
        return None
    return (d.st_dev, d.st_ino, *((f.st_ino, f.st_size, f.st_mtime_ns) for f in files))


def _fetch_sizes(k: int, n: int) -> Iterator[int]:
    """Candidate counts for a label-filtered query: 4k, then 4x more each time, until the whole index."""
    m = min(n, 4 * k)
    while True:
        yield m
        if m >= n:
            return
        m = min(n, 4 * m)


class Snapshot:
    """One loaded version of an index folder and the worker thread that answers every question about it.

    Construct it to load the folder (in the new worker thread; errors are raised here). `previous`: the snapshot
    it replaces, whose embedder is reused when the backbone is the same.
    """

    def __init__(self, folder: Path, generation: int, *, checkpoint=None, previous: Snapshot | None = None,
                 max_k: int = MAX_K, max_batch: int = MAX_BATCH):
        self.folder, self.generation, self.max_k, self.max_batch = folder, generation, max_k, max_batch
        self.stamp = folder_stamp(folder)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._users = 0
        self._retired = False
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(ready, checkpoint, previous), daemon=True,
                                        name=f"serve-{folder.name}-{generation}")
        self._thread.start()
        ready.result()

    # ---- the worker thread ------------------------------------------------------------------------------

    def _load(self, checkpoint, previous: Snapshot | None) -> None:
        if previous is not None:
            index = RetrievalIndex.load(self.folder)
            old = previous.embedder
            if (index.info.get("fingerprint"), index.info.get("pooling"), index.info.get("space", "backbone")) == (
                    old.fingerprint, old.pooling, old.space):
                self.index, self.embedder = index, old
                return
        # first load, or the folder was rebuilt with another backbone: load it (and check its fingerprint)
        self.index, self.embedder = open_index(self.folder, checkpoint)

    def _describe(self) -> None:
        index = self.index
        self.count = len(index)
        self.info = {k: v for k, v in index.info.items() if k != "sha256"}
        labels = index.labels()
        values, first, counts = np.unique(labels, return_index=True, return_counts=True)
        keep = values >= 0
        rows = index.rows_for(first[keep], thumbnails=False)
        self.labels = [{"label": int(v), "label_name": r["label_name"], "count": int(c)}
                       for v, c, r in zip(values[keep], counts[keep], rows)]

    def _run(self, ready: Future, checkpoint, previous: Snapshot | None) -> None:
        try:
            self._load(checkpoint, previous)
            self._describe()
        except BaseException as e:  # the constructor raises it
            ready.set_exception(e)
            return
        ready.set_result(None)
        stop = False
        while not stop:
            batch = [self._jobs.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            # a request that went away (its asyncio side cancelled the future) is skipped, and the rest can no
            # longer be cancelled under the worker's hands
            jobs = [job for job in batch if job is not None and job[1].set_running_or_notify_cancel()]
            searches = [(work, fut) for work, fut in jobs if isinstance(work, Query)]
            if searches:
                try:
                    self._search_batch(searches)
                except Exception as e:  # a fault of this batch fails its queries, not the worker
                    for _, fut in searches:
                        if not fut.done():
                            fut.set_exception(e)
            for work, fut in jobs:
                if not isinstance(work, Query):
                    _settle(fut, functools.partial(work, self.index))
        self.index = None  # closes its SQLite connection with the last reference

    def _search_batch(self, jobs: list[tuple[Query, Future]]) -> None:
        """Embed the batch's images together and its texts together, then one FAISS search for all of them."""
        vectors: dict[int, np.ndarray] = {}  # job number -> query vector
        excluded: dict[int, int] = {}  # job number -> id of the key it asked by (never its own hit)

        def fail(n: int, e: Exception) -> None:
            jobs[n][1].set_exception(e)

        for kind, embed in (("image", self.embedder.images), ("text", self.embedder.texts)):
            mine = [n for n, (q, _) in enumerate(jobs) if q.kind == kind]
            vectors.update(_embed_each(embed, mine, [getattr(jobs[n][0], kind) for n in mine], fail))
        for n, (q, _) in enumerate(jobs):
            if q.kind == "key":
                try:
                    excluded[n] = self.index.lookup_key(q.key)
                except KeyError as e:
                    fail(n, ServeError(404, f"{e.args[0]} in index {self.folder.name!r}"))
                    continue
                vectors[n] = self.index.vector(excluded[n])
        live = sorted(vectors)
        if not live:
            return
        n_total = len(self.index)
        k = max(next(_fetch_sizes(q.k, n_total)) if q.label is not None else min(q.k, n_total)
                for q in (jobs[n][0] for n in live))
        try:
            scores, ids = self._search(np.stack([vectors[n] for n in live]), k, [excluded.get(n, -1) for n in live])
        except Exception as e:
            for n in live:
                fail(n, e)
            return
        for row, n in enumerate(live):
            q, fut = jobs[n]
            _settle(fut, functools.partial(self._hits, q, vectors[n], scores[row], ids[row], excluded.get(n, -1)))

    def _search(self, vectors: np.ndarray, k: int, exclude: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        excl = np.asarray(exclude, dtype=np.int64)
        return self.index.search(vectors, k, exclude_ids=excl if (excl >= 0).any() else None)

    def _hits(self, q: Query, vector: np.ndarray, scores: np.ndarray, ids: np.ndarray, exclude: int) -> dict:
        """The answer to one query from its (scores, ids) row, searching deeper when a label filter leaves fewer
        than k: exact for an exact index, as if the index held only that label."""
        if q.label is not None:
            labels = self.index.labels()
            for m in _fetch_sizes(q.k, len(self.index)):
                if m > len(ids):
                    scores, ids = (a[0] for a in self._search(vector[None], m, [exclude]))
                keep = (ids >= 0) & (labels[np.maximum(ids, 0)] == q.label)
                if keep.sum() >= q.k or m >= len(self.index):
                    scores, ids = scores[keep], ids[keep]
                    break
        keep = ids >= 0
        scores, ids = scores[keep][: q.k], ids[keep][: q.k]
        rows = self.index.rows_for(ids)
        hits = [{"rank": r + 1, "id": int(i), "score": float(s), **{f: row[f] for f in HIT_FIELDS},
                 "thumbnail": row["thumbnail"] is not None}
                for r, (s, i, row) in enumerate(zip(scores, ids, rows))]
        return {"generation": self.generation, "count": len(self.index), "hits": hits}

    # ---- what requests call (from any thread) ----------------------------------------------------------------

    def submit(self, work: Query | Callable[[RetrievalIndex], Any]) -> Future:
        """Queue a search, or a function of the index to run on the worker thread; a future of its answer."""
        fut: Future = Future()
        self._jobs.put((work, fut))
        return fut

    def check(self, q: Query) -> Query:
        """Raise `ServeError` (400) for a query this index cannot answer; return it otherwise."""
        given = [x is not None for x in (q.image, q.text, q.key)]
        if sum(given) != 1:
            raise ServeError(400, "give exactly one of an image, a text or a key")
        if isinstance(q.k, bool) or not isinstance(q.k, int) or not 1 <= q.k <= self.max_k:
            raise ServeError(400, f"k must be an integer from 1 to {self.max_k}, got {q.k!r}")
        if q.text is not None and self.embedder.clip is None:
            raise ServeError(400, f"index {self.folder.name!r} is not in a CLIP space: text queries need an index "
                                  "built with `index build CLIP_RUN SHARDS --space clip`")
        if q.text is not None and not q.text.strip():
            raise ServeError(400, "the text is empty")
        if q.text is not None and len(q.text) > MAX_TEXT:
            raise ServeError(400, f"the text has {len(q.text):,} characters; the limit is {MAX_TEXT:,}")
        if q.label is not None and q.label not in {c["label"] for c in self.labels}:
            known = ", ".join(str(c["label"]) for c in self.labels) or "none"
            raise ServeError(400, f"no indexed item has label {q.label!r} (labels: {known})")
        return q

    def describe(self) -> dict:
        return {"name": self.folder.name, "generation": self.generation, "count": self.count,
                "fingerprint": self.info.get("fingerprint"), "space": self.info.get("space", "backbone"),
                "text_queries": self.embedder.clip is not None, "max_k": self.max_k, "labels": self.labels,
                "info": self.info}

    def _stop(self) -> None:
        self._jobs.put(None)


def _settle(fut: Future, fn: Callable) -> None:
    try:
        fut.set_result(fn())
    except Exception as e:  # the request gets the error; the worker goes on
        fut.set_exception(e)


def _embed_each(embed: Callable, numbers: list[int], items: list,
                fail: Callable[[int, Exception], None]) -> dict[int, np.ndarray]:
    """`embed(items)` as one batch, keyed by job number; if the batch fails, one at a time, so that one query
    the model cannot take fails alone."""
    if not items:
        return {}
    try:
        return dict(zip(numbers, embed(items).numpy()))
    except Exception:
        out = {}
        for n, item in zip(numbers, items):
            try:
                out[n] = embed([item]).numpy()[0]
            except Exception as e:
                fail(n, ServeError(400, f"could not embed this query: {e}"))
        return out


class IndexService:
    """An index folder served: its current `Snapshot`, reloaded when the folder changes.

    `poll_s` > 0 starts a daemon thread that checks the folder's stamp that often and reloads on a change. A
    failed load (a folder caught mid-replace, a file damaged in place) leaves the loaded snapshot answering and
    is kept in `problem` (what /healthz reports) and logged once; it is tried again when the folder changes
    again (or on an explicit `reload()`), and a load that succeeds clears it (logged once too).
    """

    def __init__(self, folder: str | os.PathLike, *, checkpoint=None, poll_s: float = 1.0, max_k: int = MAX_K,
                 max_batch: int = MAX_BATCH):
        self.folder = Path(folder)
        self.name = self.folder.name
        self._checkpoint, self._max_k, self._max_batch = checkpoint, max_k, max_batch
        self._reloading = threading.Lock()  # one load at a time
        self._ref = threading.Lock()  # guards the reference and the users count
        self._snapshot = Snapshot(self.folder, 1, checkpoint=checkpoint, max_k=max_k, max_batch=max_batch)
        self.problem: str | None = None  # why the folder on disk is not what is served; None when it is
        self._failed_stamp: tuple | None = None  # the folder's stamp when loading it last failed
        self._closed = threading.Event()
        self._watcher = None
        if poll_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True,
                                             name=f"serve-watch-{self.name}")
            self._watcher.start()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @contextlib.contextmanager
    def use(self) -> Iterator[Snapshot]:
        """The current snapshot, kept alive (its worker running) until the block ends."""
        with self._ref:
            snap = self._snapshot
            snap._users += 1
        try:
            yield snap
        finally:
            with self._ref:
                snap._users -= 1
                if snap._retired and snap._users == 0:
                    snap._stop()

    def reload(self, *, force: bool = False) -> Snapshot:
        """Load the folder again if it changed (always with `force`) and swap the snapshot; the current one."""
        with self._reloading:
            stamp = folder_stamp(self.folder)
            try:
                new = self._load_new(stamp, force)
            except Exception as e:
                self._failed(stamp, e)
                raise
            self._recovered()
            return new

    def _load_new(self, stamp: tuple | None, force: bool) -> Snapshot:
        current = self._snapshot
        if stamp is None:
            raise RetrievalError(f"{self.folder} is missing (being replaced?); still serving generation "
                                 f"{current.generation}")
        if stamp == current.stamp and not force:
            return current
        new = Snapshot(self.folder, current.generation + 1, checkpoint=self._checkpoint, previous=current,
                       max_k=self._max_k, max_batch=self._max_batch)
        if new.stamp != stamp or folder_stamp(self.folder) != stamp:  # replaced while it loaded: maybe mixed
            self._retire(new)
            raise RetrievalError(f"{self.folder} changed while it was loading; still serving generation "
                                 f"{current.generation}")
        with self._ref:
            self._snapshot = new
        self._retire(current)
        log.info("index %s: generation %d, %d items", self.name, new.generation, new.count)
        return new

    def _retire(self, snap: Snapshot) -> None:
        with self._ref:
            snap._retired = True
            if snap._users == 0:
                snap._stop()

    def _failed(self, stamp: tuple | None, e: Exception) -> None:
        message = str(e) or type(e).__name__
        if message != self.problem:  # once per distinct failure, not at every poll while the folder stays bad
            log.warning("index %s: reload failed, still serving generation %d: %s", self.name,
                        self._snapshot.generation, message)
        self.problem, self._failed_stamp = message, stamp

    def _recovered(self) -> None:
        if self.problem is not None:
            log.warning("index %s: recovered, serving generation %d", self.name, self._snapshot.generation)
        self.problem, self._failed_stamp = None, None

    def _watch(self, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            stamp = folder_stamp(self.folder)
            if stamp == self._snapshot.stamp:  # what is served (again, if a damaged file was put back as it was)
                if self.problem is not None:
                    with self._reloading:
                        self._recovered()
                continue
            if self.problem is not None and stamp == self._failed_stamp:
                continue  # still the version that failed: loading (and hashing) it again would fail again
            with contextlib.suppress(Exception):  # recorded and logged by reload; the loaded snapshot answers
                self.reload()

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join()
        self._retire(self._snapshot)
