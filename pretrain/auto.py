"""`auto` in a recipe: values read off the training data instead of typed by hand.

    model:
      in_chans: auto        # 3 when any stored image is RGB, else 1
      img_size: auto        # the stored square size (else the median shorter side), down to a multiple of the patch
    objective:
      dino:
        local_crop_size: auto   # DINO's 96/224 of the global crop, to the nearest multiple of the patch
        mean: auto              # per-channel statistics of the stored images, for the model's channel count
        std: auto

The numbers come from `shards.stats.dataset_stats(data.train)`: the manifest's `stats` (every stored image,
measured by the writer), a `stats.json` beside another tool's tars, or a scan of the first samples. The resolved
values replace `auto` before the recipe is validated, so the run's saved `recipe.yaml` holds them as concrete
numbers and a resumed or repeated run does not depend on the data staying the same.
"""

from __future__ import annotations

from typing import Any

from shards.stats import channel_stats, dataset_stats, stored_channels, stored_square_size

AUTO = "auto"
# DINO's local crop is 96 px at a 224 px global crop (Caron et al. 2021)
LOCAL_CROP_RATIO = 96 / 224


def may_be_auto(key: str) -> bool:
    """Whether the recipe key `key` (dotted) may say `auto`."""
    parts = key.split(".")
    if key in ("model.in_chans", "model.img_size", "objective.dino.local_crop_size"):
        return True
    return len(parts) == 3 and parts[0] == "objective" and parts[2] in ("mean", "std")


def _to_patch_multiple(size: float, patch: int, nearest: bool = False) -> int:
    """`size` down (or to the nearest) multiple of `patch`, at least one patch."""
    count = round(size / patch) if nearest else int(size) // patch
    return max(1, count) * patch


def resolve_auto(keys: set[str], config: Any) -> tuple[dict[str, Any], str]:
    """Concrete values for the `auto` `keys` of a merged recipe `config` (attribute access: data.train,
    model.patch_size, ...), and a sentence saying what was resolved from where."""
    train = str(config.data.train or "")
    if not train:
        raise ValueError(f"{', '.join(sorted(keys))}=auto: reads the training data, but data.train is not set")
    stats, origin = dataset_stats(train)
    values: dict[str, Any] = {}
    model = config.model
    in_chans = stored_channels(stats) if "model.in_chans" in keys else int(model.in_chans)
    if "model.in_chans" in keys:
        values["model.in_chans"] = in_chans
    img_size = int(model.img_size)
    if "model.img_size" in keys:
        img_size = _to_patch_multiple(stored_square_size(stats), int(model.patch_size))
        values["model.img_size"] = img_size
    if "objective.dino.local_crop_size" in keys:
        global_crop = int(config.objective.dino.global_crop_size) or img_size
        values["objective.dino.local_crop_size"] = _to_patch_multiple(global_crop * LOCAL_CROP_RATIO,
                                                                      int(model.patch_size), nearest=True)
    mean, std = channel_stats(stats, in_chans)
    for key in sorted(keys):
        if key.endswith(".mean"):
            values[key] = mean
        elif key.endswith(".std"):
            values[key] = std
    said = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
    return values, f"auto: {said} (from {origin})"


def _show(value: Any) -> str:
    return "[" + ",".join(f"{v:g}" for v in value) + "]" if isinstance(value, list) else str(value)
