"""The Accelerator for a config, and a record of where a run ran (written next to its outputs)."""

import os
import platform
import socket
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType

from .config import cuda_available


# Distributed types whose model is an ordinary module on every process (no sharding, no engine): the step can
# call torch directly, state dicts are plain, and every rank can run the model on its own.
UNSHARDED_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def pick_precision(requested):
    """`auto`: bf16 on CUDA GPUs that support it (Ampere and newer), fp16 on older CUDA GPUs, no on CPU.

    On CPU, bf16 autocast works but is usually slower than fp32 for the small models that fit there,
    so `auto` stays in fp32; ask for `bf16` explicitly to use it.
    """
    if requested != "auto":
        return requested
    if not cuda_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(cfg):
    from .validation import pins_memory

    acc = Accelerator(
        log_with=list(cfg.output.trackers) or None,  # accelerate creates them on the main process only
        project_dir=str(Path(cfg.output.dir) / "trackers"),  # where TensorBoard & co. write
        mixed_precision=pick_precision(cfg.resolved_mixed_precision),
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        dynamo_backend="no",  # the Trainer compiles in place (training.compile), keeping parameter names
        # A seedable sampler makes the shuffle a function of (seed, epoch): the recipe for exact resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    # Batches from pinned memory are copied to the device without blocking, so the copy overlaps the step
    # (the prepared loaders read this when they are made). Pinning needs the device, known only now.
    acc.dataloader_config.non_blocking = pins_memory(cfg.data, acc.device)
    return acc


def describe_environment(accelerator):
    """JSON-ready facts about this run's processes, device, precision and package versions."""
    import accelerate

    from . import __version__

    device = accelerator.device
    info = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "device": str(device),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "cr_accel": __version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
