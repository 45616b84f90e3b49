"""The few facts a command needs when torchrun or accelerate launches it as several processes."""

from __future__ import annotations

import os


def world_size() -> int:
    """Return the number of processes training together (``WORLD_SIZE`` set by torchrun / accelerate; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Return True in the process that prepares and writes outputs (global rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def init() -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPUs) if there is one and it is not joined yet;
    the Trainer then finds it. A no-op in a single process."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def share_error(error: BaseException | None) -> None:
    """Raise, in every process, the error the main process met (or nothing): the others would otherwise wait for
    it at the next barrier forever. Every process must call it; only the main process's ``error`` counts."""
    if world_size() <= 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    message = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        kind, text = message[0]
        if error is not None:
            raise error
        raise {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError,
               "PermissionError": PermissionError}.get(kind, ValueError)(text)
