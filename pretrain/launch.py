"""Make the Accelerator and refuse launches where the launcher and Accelerate disagree on the process count.

Measured with accelerate 1.15 on a GPU-less machine:
  * `accelerate launch --cpu --num_processes 2` starts ONE process (no WORLD_SIZE is set at all);
  * `torchrun --nproc_per_node 2` (or `accelerate launch --multi_gpu`) with a plain `Accelerator()` gives two
    unsynchronised rank-0 processes that race on the checkpoint folder.
We build the Accelerator with `cpu=True` whenever no GPU is visible (which makes the second case work) and
check the first case from the launcher's own command line.
"""

from __future__ import annotations

import logging
import os
import re

import torch
import yaml
from accelerate import Accelerator, __version__
from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

from shards.lifeline import exit_with_launcher

WORKING_COMMANDS = (
    "  accelerate launch --multi_gpu --num_processes N -m pretrain RECIPE.yaml\n"
    "  ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node N -m pretrain RECIPE.yaml   (drop the variable on GPUs)"
)


class LaunchError(RuntimeError):
    pass


def _launcher_requested_processes() -> int | None:
    """The --num_processes an `accelerate launch` parent asked for, if that is our parent."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("accelerate") or a == "launch" for a in argv[:3]):
        return None
    config_file = None
    for i, a in enumerate(argv):
        m = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", a)
        if m:
            value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
        m = re.fullmatch(r"--config[_-]file(?:=(.+))?", a)
        if m:
            config_file = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else None)
    # A config file's num_processes counts too: `distributed_type: MULTI_CPU` there also starts only one.
    if config_file:
        path = os.path.join(os.readlink(f"/proc/{os.getppid()}/cwd"), config_file)
        try:
            with open(path) as f:
                value = (yaml.safe_load(f) or {}).get("num_processes")
        except (OSError, yaml.YAMLError, AttributeError):
            return None
        return int(value) if isinstance(value, int) else None
    return None


def check_world(num_processes: int) -> None:
    """Raise LaunchError when the launcher started a different number of processes than Accelerate sees."""
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != num_processes:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={env_world} processes but Accelerate sees {num_processes}: the ranks "
            f"would train unsynchronised and race on the checkpoint folder. Launch with:\n{WORKING_COMMANDS}"
        )
    requested = _launcher_requested_processes()
    if env_world is None and requested is not None and requested > 1 and num_processes == 1:
        raise LaunchError(
            f"`accelerate launch` was asked for {requested} processes but started one (accelerate ignores "
            f"--num_processes together with --cpu, and a config file's `distributed_type: MULTI_CPU` without an "
            f"MPI hostfile). Launch with:\n{WORKING_COMMANDS}\n  accelerate launch --config_file "
            f"recipes/launch/cpu_2proc.yaml -m pretrain RECIPE.yaml"
        )


# Module lists whose members are transformer blocks: timm's ViT (`blocks`) and open_clip's text tower (`resblocks`).
_BLOCK_LISTS = ("blocks", "resblocks")


def fsdp_units(model: torch.nn.Module) -> list[str]:
    """Class names of the transformer blocks in `model`, each of which becomes its own FSDP unit."""
    names = set()
    for module in model.modules():
        for attr in _BLOCK_LISTS:
            blocks = getattr(module, attr, None)
            if isinstance(blocks, torch.nn.ModuleList | torch.nn.Sequential):
                names.update(type(b).__name__ for b in blocks)
    if not names:
        raise LaunchError(f"run.fsdp=true: {type(model).__name__} has no transformer blocks to shard")
    return sorted(names)


def fsdp_plugin():
    """Full shard (FSDP2, resharding after forward), one unit per transformer block, whole-tensor state dicts.
    Activation checkpointing stays timm's (`model.grad_checkpointing`), so it means the same with and without FSDP."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,
    )


def make_accelerator(*, precision: str = "no", cpu: bool = False, fsdp: bool = False, log_with=None,
                     project_dir=None, **kwargs):
    # First, before init_process_group can block on a store that lived in the launcher: a rank ends with it.
    exit_with_launcher()
    use_cpu = cpu or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if precision == "fp16" and use_cpu:
        raise LaunchError("run.precision=fp16 needs a GPU; on CPU use run.precision=bf16 (or no)")
    handlers = kwargs.pop("kwargs_handlers", None) or [DistributedDataParallelKwargs(find_unused_parameters=False)]
    acc = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=handlers,
        fsdp_plugin=fsdp_plugin() if fsdp else None,
        **kwargs,
    )
    check_world(acc.num_processes)
    if fsdp and not acc.is_fsdp2:
        if acc.num_processes > 1:  # Accelerate drops the plugin on CPU processes and would train with DDP
            raise LaunchError(
                f"run.fsdp=true needs GPU processes: Accelerate {__version__} applies FSDP only on GPUs, and "
                f"these {acc.num_processes} processes run on {acc.device.type}. Use run.fsdp=false (DDP) here."
            )
        # One process has nothing to shard over: it trains unsharded, with the same checkpoints.
        logging.getLogger("vitssl.launch").warning("run.fsdp=true with one process: nothing to shard, training unsharded")
    return acc
