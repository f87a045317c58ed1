"""Scale-out switches: shards over HTTP, activation checkpointing and torch.compile give the same training."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
import torch._inductor.config
from helpers import params, tiny_recipe

from pretrain.checkpoint import latest_checkpoint
from pretrain.launch import LaunchError
from pretrain.objectives import build_objective
from pretrain.trainer import Trainer
from shards.stream import ShardStream
from shards.tar import StreamError

SHARDS = "shard-{000000..000003}.tar"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def shard_server(digits_shards):
    """The digits shard folder served by a real HTTP server on 127.0.0.1; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(digits_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_shards_stream_every_sample_once(shard_server):
    s = ShardStream(f"{shard_server}/{SHARDS}", batch_size=64, num_workers=0, rank=0, world_size=1, seed=3)
    assert [sh.count for sh in s.shards] == [450, 449, 449, 449]
    s.set_epoch(1)
    keys, index = [], []
    for batch in s.loader():
        keys += batch["key"]
        index += batch["index"].tolist()
    assert sorted(index) == list(range(1797)) and len(set(keys)) == 1797
    assert sorted(keys) == [f"{i:08d}" for i in range(1797)]


def test_trainer_trains_from_http_shards(shard_server, tmp_path):
    out = tmp_path / "run"
    result = Trainer(tiny_recipe(f"{shard_server}/{SHARDS}", out, "run.max_steps=3", "run.visualize=false")).fit()
    assert result.steps == 3 and latest_checkpoint(out).name == "step_00000003"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)


def test_missing_http_shard_is_an_error_naming_the_url(shard_server):
    url = f"{shard_server}/shard-000009.tar"
    with pytest.raises(StreamError, match=rf"cannot read shard {url}: HTTP 404"):
        ShardStream(f"{shard_server}/shard-{{000000..000001}}.tar,{url}", batch_size=8, rank=0, world_size=1)


def test_failing_pipe_shard_is_an_error_not_an_empty_shard():
    with pytest.raises(StreamError, match="cannot read shard pipe:false"):
        ShardStream("pipe:false", batch_size=8, rank=0, world_size=1, allow_pipe=True)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same_training(digits_shards, tmp_path, switch: str, steps: int = 3, rtol=1e-5, atol=1e-6, param_atol=1e-6):
    common = [f"run.max_steps={steps}", "run.visualize=false", "model.drop_path_rate=0.1"]
    base, other = tmp_path / "base", tmp_path / "other"
    Trainer(tiny_recipe(digits_shards, base, *common)).fit()
    Trainer(tiny_recipe(digits_shards, other, *common, switch)).fit()
    torch.testing.assert_close(torch.tensor(_losses(other)), torch.tensor(_losses(base)), rtol=rtol, atol=atol)
    a, b = params(latest_checkpoint(base)), params(latest_checkpoint(other))
    assert a.keys() == b.keys(), "the switch must not rename parameters (checkpoints stay interchangeable)"
    for k in a:
        diff = float((b[k] - a[k]).abs().max())
        assert diff <= param_atol, f"{k} differs by {diff:.3g} with {switch}"


def test_grad_checkpointing_trains_the_same(digits_shards, tmp_path):
    # drop_path on: recomputation must replay the same random numbers (checkpoint preserves the RNG state).
    _same_training(digits_shards, tmp_path, "model.grad_checkpointing=true")


def test_grad_checkpointing_keeps_fewer_activations(digits_shards, tmp_path):
    """MAE's visible-token encoder runs the blocks itself; checkpointing must reach it (fewer saved tensors)."""
    batch = next(iter(ShardStream(digits_shards, batch_size=16, rank=0, world_size=1,
                                  transform=build_objective(tiny_recipe(digits_shards, tmp_path)).train_transform())))
    saved, grads = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        objective = build_objective(tiny_recipe(digits_shards, tmp_path, f"model.grad_checkpointing={on}"))
        assert objective.backbone.grad_checkpointing is on
        n = [0]

        def pack(t, n=n):
            n[0] += t.numel()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = objective(batch)
        loss.backward()
        saved[on] = n[0]
        grads[on] = {k: p.grad.clone() for k, p in objective.named_parameters() if p.grad is not None}
    assert saved[True] < saved[False], f"checkpointing saved {saved[True]} values vs {saved[False]} without"
    assert grads[True].keys() == grads[False].keys()
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # ~90 s on 2 shared CPU cores, nearly all of it inductor compiling C++
def test_compile_trains_the_same(digits_shards, tmp_path, monkeypatch):
    # Inductor draws random numbers (MAE's masks, drop path) from its own generator; fallback_random makes it
    # use eager's, so the two runs see the same masks and must agree to float tolerance.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    # Parameters: Adam turns float noise in near-zero gradients (the attention key bias has none in exact
    # arithmetic) into steps of up to lr = 1.25e-4 each, so 3 steps may move such a weight by ~4e-4.
    _same_training(digits_shards, tmp_path, "run.compile=true", rtol=1e-4, atol=1e-5, param_atol=5e-4)


def test_compile_without_a_compiler_fails_at_start(digits_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-vitssl")
    with pytest.raises(LaunchError, match="run.compile=true on the CPU needs a C\\+\\+ compiler"):
        Trainer(tiny_recipe(digits_shards, tmp_path / "run", "run.compile=true"))
