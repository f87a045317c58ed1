"""`make demo` end to end at a few epochs: every stage runs and the summary's headline compares like with like."""

import json
from pathlib import Path

import pytest

from downstream import demo

pytestmark = pytest.mark.slow


def test_demo_summary_headline(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--epochs", "2", "--finetune-epochs", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    head = summary["headline"]
    pre, base = summary["finetune"]["from MAE"], summary["finetune"]["from random weights"]
    # the baseline is the same recipe for the same number of updates, only the initial weights differ
    assert pre["steps"] == base["steps"] == head["updates"] > 0
    assert head["pretrained"] == pre["top1"] and head["baseline"] == base["top1"]
    assert head["pretraining_wins"] == (pre["top1"] > base["top1"])
    assert 0.0 <= base["top1"] <= 1.0 and 0.0 <= pre["top1"] <= 1.0
    runs = out / "runs"
    random_init = json.loads((runs / "finetune_random" / "finetune.json").read_text())["settings"]
    from_mae = json.loads((runs / "finetune_mae" / "finetune.json").read_text())["settings"]
    assert random_init["pretrained"] == "" and from_mae["pretrained"] == str(runs / "mae")
    assert random_init["architecture_from"] == from_mae["architecture_from"]
    for path in summary["pictures"].values():
        assert Path(path).is_file(), path
