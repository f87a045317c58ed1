"""Retrieval contact sheets: one row per query, the query beside its top-k results, as a PNG.

Also makes the small PNG thumbnails that the retrieval index stores per item, so a sheet can be drawn from
the index alone without re-reading shards.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from shards.atomic import atomic_path

IMAGE_KEYS = ("image", "thumbnail")  # where a result dict may carry its picture


def to_image(image: Any) -> Image.Image:
    """A PIL image from a PIL image, encoded bytes (PNG/JPEG), or an array (H,W), (H,W,C) or (C,H,W)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
            return img
        except (OSError, ValueError) as e:
            raise ValueError(f"image bytes are not a readable picture: {e}") from e
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.size == 0:
        raise ValueError(f"cannot show an array of shape {arr.shape} as an image: use (H,W), (H,W,3|4) or (3,H,W)")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image array has NaN or infinite values")
        if arr.min() >= 0 and arr.max() <= 1:  # floats in [0, 1]; anything else is taken as 0..255
            arr = arr * 255
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def thumbnail_png(image: Any, size: int = 64) -> bytes:
    """PNG bytes of `image` shrunk to fit size x size (aspect kept; never enlarged)."""
    if size < 1:
        raise ValueError(f"thumbnail size must be positive, got {size}")
    img = to_image(image).copy()
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _result_image(result: dict) -> Any:
    for key in IMAGE_KEYS:
        if result.get(key) is not None:
            return result[key]
    return None


def _fit(text: str, width: int, *, keep_end: bool = False) -> str:
    """`text` cut to `width` characters with an ellipsis; `keep_end` keeps its end (a path's file name)."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_end else text[: width - 1] + "…"


def _result_text(result: dict, width: int) -> str:
    label = result.get("label_name") or result.get("caption") or ""
    if not label and result.get("label") is not None:
        label = str(result["label"])
    lines = [_fit(label, width)]
    score = result.get("score")
    if score is not None:
        lines.insert(0, f"{score:.3f}")
    if result.get("source"):
        lines.append(_fit(str(result["source"]), width, keep_end=True))
    return "\n".join(lines)


def _show(ax, image: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        return
    img = to_image(image)
    if img.mode == "L":
        ax.imshow(np.asarray(img), cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.asarray(img.convert("RGB")))


def contact_sheet_png(
    queries: Sequence[Any],
    results: Sequence[Sequence[dict]],
    path: str | os.PathLike,
    query_titles: Sequence[str] | None = None,
    *,
    cell_inches: float = 1.4,
    dpi: int = 100,
) -> Path:
    """Draw each query (left) beside its results and write a PNG atomically; returns the path.

    A result is a dict with the picture under "image" (or "thumbnail", e.g. a row from `RetrievalIndex.rows_for`
    plus "score"), a "score", "label_name" or "caption" for its caption, and optionally its "source" name (shown
    below, its end kept when it is long). An optional "match" (bool) colours the caption green or red. Pictures
    are PIL images, arrays or PNG/JPEG bytes. A query title may have several lines (its source on the second).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"contact sheet path must end in .png, got {path}")
    if len(queries) == 0:
        raise ValueError("no queries to draw")
    if len(results) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
    if query_titles is not None and len(query_titles) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(query_titles)} query titles")
    for i, line in enumerate(results):
        for j, r in enumerate(line):
            if not isinstance(r, dict):
                raise ValueError(f"result {j} of query {i} must be a dict, got {type(r).__name__}")
    k = max(1, max(len(line) for line in results))
    lines = max([1 + (r.get("source") is not None) for line in results for r in line]
                + [len(t.splitlines()) - 1 for t in query_titles or []] + [1])
    fig = Figure(figsize=((k + 1) * cell_inches + 0.2, len(queries) * (cell_inches + 0.3 + 0.15 * lines)), dpi=dpi)
    axes = fig.subplots(len(queries), k + 1, squeeze=False)
    width = max(8, int(cell_inches * 11))
    for i, (query, line) in enumerate(zip(queries, results)):
        _show(axes[i][0], query)
        title = query_titles[i] if query_titles is not None else "query"
        first, *rest = title.splitlines() or [""]
        title = "\n".join([_fit(first, width, keep_end="/" in first), *(_fit(t, width, keep_end=True) for t in rest)])
        axes[i][0].set_title(title, fontsize=8, fontweight="bold")
        for spine in axes[i][0].spines.values():
            spine.set_linewidth(2.5)
        for j in range(k):
            ax = axes[i][j + 1]
            if j >= len(line):
                ax.axis("off")
                continue
            _show(ax, _result_image(line[j]))
            match = line[j].get("match")
            color = "black" if match is None else ("tab:green" if match else "tab:red")
            ax.set_title(_result_text(line[j], width), fontsize=7, color=color)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
