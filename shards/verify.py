"""Check a shard set against its manifest: checksums, counts, every image decodes, labels in range.

A manifest that lists a file outside its folder is a problem and nothing it lists is opened
(`shards.manifest.shard_path`). Images the reader has to convert (high bit depth, transparency; see
`shards.sources.normalize_image`) are not problems, but the report notes how many there are.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from shards.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest, sha256_file
from shards.record import image_extension, no_image_problem, parse_label
from shards.sources import ALPHA_COMPOSITED, normalize_image
from shards.tar import iter_tar_samples, open_shard


@dataclass
class Problem:
    shard: str  # shard file name, or "" for the set as a whole
    key: str  # sample key, or "" for the shard as a whole
    what: str

    def __str__(self) -> str:
        where = " ".join(p for p in (self.shard, f"key {self.key}" if self.key else "") if p) or "shard set"
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    folder: Path
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not problems, but worth knowing (converted images)

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_keys(self) -> set[tuple[str, str]]:
        return {(p.shard, p.key) for p in self.problems if p.key}

    def format(self) -> str:
        lines = [f"BAD {p}" for p in self.problems] + [f"NOTE {n}" for n in self.notes]
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        verdict += f" with {len(self.notes)} note(s)" if self.notes else ""
        lines.append(f"{verdict}: {self.folder}: {self.shards_checked} shards, {self.samples_checked} samples checked")
        return "\n".join(lines)


def _check_image(ext: str, data: bytes, manifest: Manifest, converted: Counter[str]) -> list[str]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, size = im.mode, [im.height, im.width]
            change = normalize_image(im)[1]  # what the reader will do to it
    except Exception as e:  # any decoder failure is a finding here, not a crash
        return [f"undecodable .{ext} image ({type(e).__name__}: {e})"]
    wrong = []
    if manifest.image_mode and mode != manifest.image_mode:
        wrong.append(f"image mode {mode}, manifest says {manifest.image_mode}")
    if manifest.image_size and size != list(manifest.image_size):
        wrong.append(f"image size {size}, manifest says {manifest.image_size}")
    if change:
        converted[f"{mode} with transparency" if change == ALPHA_COMPOSITED else mode] += 1
    return wrong


def _check_sample(key: str, files: dict[str, bytes], manifest: Manifest, converted: Counter[str]) -> list[str]:
    """What is wrong with one sample, as short sentences; images the reader converts are counted in
    `converted` by their stored mode ("RGBA with transparency", "I;16", ...)."""
    wrong = [files["__bad__"].decode()] if "__bad__" in files else []
    ext = image_extension(files)  # the one the stream reads
    if ext is None:
        wrong.append(no_image_problem(files))
    else:
        wrong += _check_image(ext, files[ext], manifest, converted)
    try:
        label = parse_label(files)
    except ValueError:
        wrong.append(f"bad label {files['cls'][:20]!r}: not an integer")
    else:
        if label is not None and manifest.classes and not 0 <= label < len(manifest.classes):
            wrong.append(f"bad label {label}: out of range for {len(manifest.classes)} classes")
    if "txt" in files:
        try:
            files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            wrong.append("caption is not UTF-8")
    elif manifest.has_captions:
        wrong.append("no caption (.txt) though the manifest says every sample has one")
    if "json" in files:
        try:
            json.loads(files["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            wrong.append("metadata .json does not parse")
    return wrong


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    with open_shard(str(path)) as stream:  # the reader the stream uses, so both see the same samples
        yield from iter_tar_samples(stream)


def _scanned_manifest(folder: Path) -> Manifest:
    """A stand-in manifest for a set without one: its tars in name order, nothing promised about them."""
    return Manifest(shards=[ShardInfo(p.name, 0, "") for p in sorted(folder.glob("*.tar"))])


def verify(folder: str | Path) -> VerifyReport:
    """Re-hash every shard, open every sample and report each bad shard or key.

    A folder of tars without a manifest (another tool's set) is decoded sample by sample; with nothing to
    compare against, only what the reader would refuse is a problem."""
    folder = Path(folder)
    report = VerifyReport(folder)
    foreign = folder.is_dir() and not (folder / MANIFEST_NAME).exists() and any(folder.glob("*.tar"))
    if foreign:  # another tool's set (img2dataset, webdataset): decode everything, no checksums to compare
        manifest = _scanned_manifest(folder)
        report.notes.append(f"no {MANIFEST_NAME} (written by another tool): every sample decoded, but no "
                            "checksums or counts to compare")
    else:
        try:
            manifest = load_manifest(folder)
        except (FileNotFoundError, ValueError) as e:
            report.problems.append(Problem("", "", str(e)))
            return report
    listed = {s.name for s in manifest.shards}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        report.problems.append(Problem(extra, "", "tar file not listed in the manifest"))
    seen: dict[str, str] = {}
    converted: Counter[str] = Counter()
    for shard in manifest.shards:
        path = folder / shard.name
        problems = report.problems
        if not path.is_file():
            problems.append(Problem(shard.name, "", "missing shard file"))
            continue
        report.shards_checked += 1
        if not foreign and path.stat().st_size != shard.bytes:
            problems.append(Problem(shard.name, "", f"{path.stat().st_size} bytes, manifest says {shard.bytes}"))
        if not foreign and sha256_file(path) != shard.sha256:
            problems.append(Problem(shard.name, "", "sha256 does not match the manifest"))
        count = 0
        try:
            for key, files in _samples(path):
                count += 1
                if key in seen:
                    problems.append(Problem(shard.name, key, f"duplicate key (also in {seen[key]})"))
                seen[key] = shard.name
                problems += [Problem(shard.name, key, w) for w in _check_sample(key, files, manifest, converted)]
        except (tarfile.TarError, EOFError, OSError) as e:
            problems.append(Problem(shard.name, "", f"corrupt or truncated tar after {count} samples ({e})"))
        report.samples_checked += count
        if not foreign and count != shard.count:
            problems.append(Problem(shard.name, "", f"{count} samples, manifest says {shard.count}"))
    for what, n in sorted(converted.items()):
        how = "composited onto white" if what.endswith("transparency") else "scaled to 8 bits (not clipped)"
        report.notes.append(f"{n} image(s) stored as {what}: the reader converts them ({how})")
    return report
