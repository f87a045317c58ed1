"""No command removes or replaces anything it did not write.

Every folder the project writes carries a marker file naming what it is (a shard set, an index, a run, ...).
Before a writer puts anything at `out` it asks `claim_output`: a new or empty folder is free; a folder marked
with the same kind is the writer's own, replaced only with an explicit overwrite (or added to, for the kinds a
command resumes into, such as a run); anything else — a user's folder, a file, another kind's output — is
refused by name. `atomic_path` asks `marked_kind` again before it swaps a finished folder into place, so the
rule holds for every caller, not only the ones that remember to check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

MARKER_NAME = ".vitssl-output.json"
KINDS = ("shards", "images", "index", "backbone", "open_clip", "run", "split", "eval", "demo")


class OutputExistsError(FileExistsError):
    """`out` holds something this command may not replace; the message names it and the way out."""


def mark_output(folder: str | os.PathLike, kind: str) -> None:
    """Record in `folder` that the project wrote it as a `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {KINDS}")
    # Renamed into place: another rank may read it while it is written (shards.atomic imports this module).
    tmp = Path(folder) / f".{MARKER_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"written_by": "vitssl", "kind": kind}) + "\n")
    os.replace(tmp, Path(folder) / MARKER_NAME)


def marked_kind(folder: str | os.PathLike) -> str | None:
    """The kind `folder`'s marker names, or None when it has no readable marker (not ours)."""
    try:
        data = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) and data.get("written_by") == "vitssl" else None
    return kind if kind in KINDS else None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def claim_output(out: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False,
                 flag: str = "--overwrite") -> str:
    """May a `kind` be written at `out`? Returns "new" (absent or an empty folder), "resume" (our own `kind`,
    and the caller adds to it) or "replace" (our own `kind`, `overwrite` given); raises OutputExistsError
    for everything else, naming what is there. `flag` is how the caller's user says overwrite."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return "new"
    if is_empty_dir(out):
        return "new"
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; refusing to replace it (choose another output)")
    found = marked_kind(out)
    if found is None:
        raise OutputExistsError(
            f"{out} holds files that vitssl did not write (no {MARKER_NAME}); refusing to write into or replace it: "
            "choose a new or empty folder")
    if found != kind:
        raise OutputExistsError(f"{out} holds a vitssl {found} output, not a {kind}; refusing to replace it: "
                                "choose another folder")
    if resume:
        return "resume"
    if not overwrite:
        raise OutputExistsError(f"{out} holds a {kind} written earlier; pass {flag} to replace it")
    return "replace"


def refuse_input_overlap(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """ValueError when `out` is one of `inputs`, lies inside one, or holds one: writing there would read
    (or replace) the data being written."""
    target = Path(out).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if target == path or path in target.parents or target in path.parents:
            raise ValueError(f"the output {out} overlaps the input {given}; choose an output outside the inputs")
