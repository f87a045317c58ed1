"""Every shipped recipe resumes exactly after a SIGKILL at a random step.

Each recipe in recipes/*.yaml, shrunk by overrides to a tiny ViT on 120 digits (a few steps over several epochs,
so epoch-scheduled things such as DINO's frozen last layer and every weight-decay, momentum and temperature
schedule cross a resume), is trained three times:
  * straight through, in this process (the reference);
  * in a child process that SIGKILLs itself as soon as it has checkpointed a randomly drawn step;
  * relaunched from that child's newest checkpoint, in this process, to the end.
The relaunched run's final weights (backbone, heads, teacher, buffers) must equal the reference's.

The killed children come from a forkserver that has imported the project once, so the eight kills cost one
interpreter start, not eight, and each child runs beside the reference run of the same recipe.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_VIT, params

import pretrain.trainer as trainer_module
from pretrain.checkpoint import latest_checkpoint
from pretrain.recipe import load_recipe
from pretrain.trainer import Trainer
from shards.sources import digits_source
from shards.writer import write_shard_set

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MAX_STEPS = 12

# Tiny dimensions for every objective; keys of objectives a recipe does not use are valid and inert.
SHRINK = [
    "model.img_size=16",
    *TINY_VIT,
    "model.drop_path_rate=0.1",  # the stochastic depth RNG must resume too
    "data.batch_size=16",
    "data.num_workers=0",
    "data.shuffle_buffer=32",
    "data.epoch_samples=96",  # resampled recipes (LAION): 6 batches an epoch
    "data.val=null",
    "objective.mae.decoder_embed_dim=32",
    "objective.mae.decoder_depth=1",
    "objective.mae.decoder_num_heads=2",
    "objective.mae.mean=[]",
    "objective.mae.std=[]",
    "objective.dino.out_dim=64",
    "objective.dino.hidden_dim=32",
    "objective.dino.bottleneck_dim=16",
    "objective.dino.global_crop_size=16",
    "objective.dino.local_crops_number=2",
    "objective.dino.local_crop_size=8",
    "objective.dino.mean=[]",
    "objective.dino.std=[]",
    "objective.clip.embed_dim=16",
    "objective.clip.text_context_length=16",
    "objective.clip.text_width=32",
    "objective.clip.text_heads=2",
    "objective.clip.text_layers=1",
    "objective.clip.mean=[]",
    "objective.clip.std=[]",
    "objective.supervised.init_from=''",
    "objective.supervised.num_classes=10",
    "optim.warmup_steps=3",
    f"run.max_steps={MAX_STEPS}",
    "run.max_minutes=0",
    "run.fit_to_max_minutes=false",
    "run.checkpoint_every_steps=1",
    "run.checkpoint_every_minutes=0",
    "run.keep_last=3",
    "run.precision=no",
    "run.cpu=true",
    "run.fsdp=false",
    "run.compile=false",
    "run.progress=false",
    "run.visualize=false",
    "run.trackers=[jsonl]",
    "run.log_every=1",
]


def _overrides(shards: Path, out: Path, extra=()) -> list[str]:
    return [*SHRINK, f"data.train={shards}", f"run.out_dir={out}", *extra]


def _train_until_killed(recipe: str, overrides: list[str], threads: int, kill_at: int) -> None:
    """The child's whole life: train, and SIGKILL itself as soon as the checkpoint of step `kill_at` is complete.
    The kill comes from inside (after the trainer's own save returns), not from a watcher in the parent: a thread
    there shares the GIL with the reference run and could miss the few steps between `kill_at` and the end."""
    torch.set_num_threads(threads)
    save = trainer_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if kwargs["state"].step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer_module.save_checkpoint = save_then_die
    Trainer(load_recipe(recipe, overrides)).fit()


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """120 digits in 4 shards (a few steps make several epochs)."""
    source = digits_source()
    out = tmp_path_factory.mktemp("digits120") / "digits"
    write_shard_set((s for i, s in zip(range(120), source)), out, classes=source.classes, source="digits[:120]",
                    samples_per_shard=30)
    return out


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pretrain.trainer", "pretrain.objectives", "test_resume_recipes"])
    return ctx


def test_every_shipped_recipe_is_covered():
    names = {p.name for p in RECIPES}
    assert {"mae_vit_tiny_fmnist.yaml", "dino_vit_tiny_fmnist.yaml", "clip_vit_tiny_fmnist.yaml",
            "finetune_vit_tiny_fmnist.yaml", "dino_vit_small_in1k.yaml"} <= names


# Every shipped recipe as it is, plus the other place DINO's view randomness can live: the Fashion-MNIST recipe
# makes its views on the batch (augment=batched, seeded per sample by the run seed, the epoch and the sample's
# index), the ImageNet one per sample in the workers (augment=pil); each is also run the other way.
CASES = [(p, ()) for p in RECIPES] + [(ROOT / "recipes" / "dino_vit_tiny_fmnist.yaml", ("objective.dino.augment=pil",)),
                                      (ROOT / "recipes" / "dino_vit_small_in1k.yaml", ("objective.dino.augment=batched",))]


@pytest.mark.parametrize("recipe,extra", CASES, ids=[p.stem + "".join(f"[{e}]" for e in x) for p, x in CASES])
@pytest.mark.multiprocess
def test_recipe_resumes_exactly_after_sigkill(recipe, extra, small_digits, tmp_path, forkserver):
    seed = random.SystemRandom().randrange(10**6)  # not the global RNG, which earlier trainers seeded alike
    kill_at = random.Random(seed).randint(2, MAX_STEPS - 5)
    why = f"{recipe.name} {list(extra)}, SIGKILL after step {kill_at} (seed {seed})"

    killed = tmp_path / "killed"
    # One thread here and one in the child: the two run side by side on 2 cores without oversubscribing
    # OpenMP (which slows both ~20x), and with the same thread count their float sums agree.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    child = forkserver.Process(target=_train_until_killed,
                               args=(str(recipe), _overrides(small_digits, killed, extra), 1, kill_at))
    child.start()
    try:
        # Meanwhile, the reference: straight through in this process.
        Trainer(load_recipe(recipe, _overrides(small_digits, tmp_path / "straight", extra))).fit()
    finally:
        child.join(120)
        hung = child.is_alive()
        if hung:
            child.kill()
        torch.set_num_threads(threads)
    straight = tmp_path / "straight"
    assert not hung, f"{why}: the child neither finished nor died within 120 s"
    assert child.exitcode == -signal.SIGKILL, f"{why}: the child ended on its own (exit {child.exitcode})"
    died_at = latest_checkpoint(killed)
    assert died_at is not None and int(died_at.name.split("_")[1]) == kill_at < MAX_STEPS, f"{why}: died at {died_at}"

    torch.manual_seed(4321)  # disturb this process's RNG: the checkpoint must restore it
    torch.set_num_threads(1)
    try:
        result = Trainer(load_recipe(recipe, _overrides(small_digits, killed, extra))).fit()
    finally:
        torch.set_num_threads(threads)
    assert result.steps == MAX_STEPS

    a, b = params(latest_checkpoint(straight)), params(latest_checkpoint(killed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6,
                                   msg=f"{why}: {k} differs from the uninterrupted run after resuming at {died_at.name}")
