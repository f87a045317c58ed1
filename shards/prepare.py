"""One sample from its source to tar bytes: open (an image file the source left unopened), convert to 8-bit
L/RGB, resize, encode, measure. `Preparer` is what the writer runs for every sample, in its worker processes
when it has them; the same code either way, so the shards are the same bytes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from shards.record import Record, encode_sample
from shards.resize import Resize
from shards.sources import UNREADABLE, ImageFile, RawSample, normalize_image
from shards.stats import ImageSummary, summarize


@dataclass(frozen=True)
class Encoded:
    """One sample ready for a tar: its record, what `normalize_image` changed, and its measurements."""

    record: Record
    change: str
    summary: ImageSummary
    label: int | None
    has_caption: bool


@dataclass(frozen=True)
class Unreadable:
    """A source entry whose image file could not be opened: skipped and counted, not stored."""

    what: str
    why: str


@dataclass(frozen=True)
class Preparer:
    """Opens, converts (8-bit L/RGB), resizes, encodes and measures one sample. A picklable callable, so the
    writer can run it in worker processes; the same code either way, so the bytes do not depend on where."""

    classes: tuple[str, ...]
    encoding: str = "png"
    jpg_quality: int = 95
    resize: Resize = Resize()

    def __call__(self, sample: RawSample) -> Encoded | Unreadable:
        image = sample.image
        if isinstance(image, ImageFile):
            try:
                image = image.open()
            except UNREADABLE as e:
                return Unreadable(image.what, f"unreadable image ({e})")
        image, change = normalize_image(image)
        image = self.resize(image)
        record = encode_sample(replace(sample, image=image), list(self.classes), self.encoding, self.jpg_quality)
        return Encoded(record, change, summarize(image), sample.label, sample.caption is not None)
