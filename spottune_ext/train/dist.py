"""Processes: joining torchrun's process group, and keeping the processes' views of the run equal."""
import hashlib
import os

import torch
import torch.distributed as dist


def init(device):
    """(world size, rank, device): joins the process group when started by torchrun; each process
    then takes the CUDA device of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, dist.get_rank(), device


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world):
    if world > 1:
        dist.barrier()


def all_reduce(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)


def sync_buffers(net, world):
    """Rank 0's buffers (BatchNorm running statistics) on every process: each process updated its own
    during its last forward, and evaluation is split over the processes."""
    if world > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)


def weights_sha256(net):
    """sha256 of every parameter's name and bytes: equal on every process when DDP kept them in step."""
    digest = hashlib.sha256()
    for name, tensor in net.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
