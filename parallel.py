"""Many processes: torchrun set-up, FSDP2 sharding with per-block compile, the DDP wrapper.
One process per GPU (or gloo CPU slot) under `torchrun --nproc_per_node=N`; see docs/scaling.md.
"""
import datetime
import os
import warnings

import torch
import torch.distributed as dist

from data import DataError


def init_distributed(device, timeout_s=7200):
    """torchrun's RANK / LOCAL_RANK / WORLD_SIZE -> (world, rank, device); TF32 on. `cuda` means this
    process's GPU (cuda:LOCAL_RANK); an explicit cuda:N is kept in a single process. timeout_s bounds
    how long a rank waits in a collective (NCCL's default, 10 min, is shorter than rank 0's slow writes)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DataError(f"--device {device} but no GPU is visible; use --device cpu")
        if world > 1 or device == "cuda":
            device = f"cuda:{local}"
        elif int(device.split(":")[1]) >= torch.cuda.device_count():
            raise DataError(f"--device {device}, but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return world, rank, device


def shard(model, device, world):
    """FSDP2: a unit per block and per Mixer, then the rest; on GPU bf16 compute, fp32 grad reduction.
    Units keep their inputs' dtype (cast_forward_inputs=False): the residual stream's precision is set by the
    model (model.py), the same under DDP and FSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.split(":")[0], (world,))
    mp = (MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
          if device.startswith("cuda") else MixedPrecisionPolicy())
    for unit in [*model.encoder.vit.blocks, *model.decoder.vit.blocks, model.encoder.mixer, model.decoder.mixer, model]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # forward() returns chunk/view outputs; we never modify them in place, which is what FSDP warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
