"""The few facts a command needs when torchrun or accelerate launches it as several processes."""

from __future__ import annotations

import os

from safeft.errors import USER_ERRORS, UserError


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

    message = [None if error is None else (isinstance(error, USER_ERRORS), type(error).__name__, str(error))]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        # every process leaves the group together before it stops: a process exiting with the group still joined
        # (its store served by the main process) aborts, SIGABRT, instead of exiting with the error's code
        dist.barrier()
        dist.destroy_process_group()
        if error is not None:
            raise error
        user, kind, text = message[0]
        # bad input stops every process as bad input (exit code 2 and the same one line); anything else as a bug
        raise UserError(text) if user else RuntimeError(f"the main process failed: {kind}: {text}")


# --- FSDP2: parameters sharded on dim 0 (DTensor), and SPF's one batched collective per step ----------------------


def is_sharded(tensor) -> bool:
    """Return True if ``tensor`` is a DTensor (a parameter or gradient FSDP2 shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return False
    return isinstance(tensor, DTensor)


def local(tensor):
    """Return the part of ``tensor`` this process holds: a DTensor's local shard (same storage), else ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_rows(tensor) -> slice | None:
    """Return the global rows this process holds of a DTensor sharded on dim 0 (FSDP2's layout), None if
    ``tensor`` is not sharded.

    Raises:
        ValueError: for another layout (sharded on another dim, replicated, a mesh of more than one dimension).
    """
    if not is_sharded(tensor):
        return None
    from torch.distributed.tensor import Shard

    placements = tensor.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise UserError(f"SPF supports parameters sharded on dim 0 over a one-dimensional mesh (FSDP2's "
                         f"fully_shard), got placements {placements}; shard with fully_shard(model, mesh=1-D mesh)")
    rows, mesh = tensor.shape[0], tensor.device_mesh
    per = -(-rows // mesh.size())  # torch.chunk's split: the first ranks hold ceil(rows / world) rows each
    start = min(mesh.get_local_rank() * per, rows)
    held = tensor.to_local().shape[0]
    if held != min(per, rows - start):
        raise UserError(f"unexpected shard of {held} rows at row {start} of {rows}: not torch.chunk's layout")
    return slice(start, start + held)


class Collectives:
    """Sums tensors over all processes in one flat all-reduce, and keeps a count: ``calls`` and ``elements``
    (per call) since the last :meth:`reset`. With one process (or no process group) it returns its inputs."""

    def __init__(self):
        self.calls = 0
        self.elements: list[int] = []

    def reset(self) -> None:
        self.calls, self.elements = 0, []

    def sum(self, tensors: list) -> list:
        """Return ``tensors`` summed over all processes (same shapes, fp32), with one collective for all of them."""
        import torch
        import torch.distributed as dist

        if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
            return tensors
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        self.calls += 1
        self.elements.append(flat.numel())
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]
