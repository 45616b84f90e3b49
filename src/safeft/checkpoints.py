"""Checkpoints that prove themselves: every Trainer checkpoint gets a manifest of its files (sizes and sha256), written
last and atomically, and a resume uses the newest checkpoint whose files match their manifest.

A kill (or a full disk, or a dying node) can stop a save between two files or inside one. The manifest is written
only once every file of the checkpoint is on disk, so a checkpoint without one was cut short, and a file whose size
or hash differs from the record was damaged after. Two checkpoints are kept, so one intact checkpoint survives any
single interrupted save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

from safeft.errors import UserError
from safeft.io import INCOMPLETE, MARKER, write_json

MANIFEST = "safeft-manifest.json"  # inside each checkpoint folder, written last
FORMAT = "safeft.checkpoint/1"
KEEP = 2  # checkpoints kept: the newest, and one to fall back to if the newest was cut short
logger = logging.getLogger("safeft")


def step_of(folder: str | Path) -> int | None:
    """Return the step of a ``checkpoint-<step>`` folder, or None for any other name."""
    tail = Path(folder).name.removeprefix("checkpoint-")
    return int(tail) if Path(folder).name.startswith("checkpoint-") and tail.isdigit() else None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Return the ``checkpoint-<step>`` folders in ``output_dir``, newest (highest step) first."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of, reverse=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    # safeft.io.writing's own markers come and go with the output around the folder: not part of what it saved
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, INCOMPLETE, MARKER)
                  and not p.name.endswith(".tmp"))


def write_manifest(folder: str | Path) -> Path:
    """Record every file of the checkpoint ``folder`` (relative name, bytes, sha256) in its manifest, atomically;
    call it once every file is written. Returns the manifest's path. Any saved folder can carry one (safeft also
    writes it into aligned models and the models ``safeft bench --keep-models`` keeps)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    write_json(folder / MANIFEST, {"format": FORMAT, "step": step_of(folder), "files": files})
    return folder / MANIFEST


def check_checkpoint(folder: str | Path) -> list[str]:
    """Return what is wrong with the checkpoint ``folder`` against its manifest (empty if every recorded file is
    there with its size and hash): a missing or unreadable manifest, and each missing, resized or changed file."""
    folder = Path(folder)
    try:
        record = json.loads((folder / MANIFEST).read_text())
        files = record["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST} (the save was cut short)"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return [f"{MANIFEST} is damaged"]
    problems = []
    for name, entry in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != entry["bytes"]:
                problems.append(f"{name} has {size} bytes, {entry['bytes']} recorded")
            elif _sha256(path) != entry["sha256"]:
                problems.append(f"{name} does not match its recorded sha256")
        except OSError:  # gone, or being removed by another process of the run
            problems.append(f"{name} is missing")
    return problems


def resume_checkpoint(output_dir: str | Path, *, remove_damaged: bool = True) -> Path | None:
    """Return the checkpoint to resume from: the newest in ``output_dir`` that matches its manifest, or None if there
    is no checkpoint at all.

    Says which one it uses, and why, in one line (a warning on the ``safeft`` logger when it falls back past a damaged
    one). Damaged checkpoints newer than the one used are removed (with ``remove_damaged``; the resumed run writes
    them again).

    Raises:
        UserError: if no checkpoint is intact, naming each one's damaged files and the choices.
    """
    folders = checkpoint_folders(output_dir)
    damaged: list[tuple[Path, list[str]]] = []
    for folder in folders:
        problems = check_checkpoint(folder)
        if not problems:
            break
        damaged.append((folder, problems))
    else:
        if not folders:
            return None
        listing = "; ".join(f"{f.name}: {', '.join(p)}" for f, p in damaged)
        raise UserError(f"cannot resume: no intact checkpoint in {output_dir} ({listing}). Start over with "
                        "--overwrite, or point at a checkpoint you trust (e.g. one an older safeft saved without a "
                        f"manifest) with --resume-from {Path(output_dir) / 'checkpoint-<step>'}: it is used as it is")
    if not damaged:
        logger.info("resuming from %s (step %d): its files match its manifest", folder.name, step_of(folder))
        return folder
    listing = "; ".join(f"{f.name} is damaged ({', '.join(p)})" for f, p in damaged)
    logger.warning("resuming from %s (step %d), the newest intact checkpoint: %s", folder, step_of(folder), listing)
    if remove_damaged:
        for f, _ in damaged:
            shutil.rmtree(f, ignore_errors=True)
    return folder


def has_checkpoint(partial: str | Path) -> list[Path]:
    """Return the checkpoints an interrupted run left in its partial output ``partial`` (``trainer/checkpoint-*``)."""
    return checkpoint_folders(Path(partial) / "trainer")


def check_restart(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run into ``out`` afresh when its ``<out>.partial`` holds a checkpoint to resume from, unless
    ``resume`` (continue it) or ``overwrite`` (start over: the checkpoints are deleted) says which."""
    partial = Path(out).with_name(Path(out).name + ".partial")
    left = has_checkpoint(partial) if not resume and not overwrite else []
    if left:
        raise UserError(f"{partial} holds an interrupted run with a checkpoint to resume from ({left[0].name}); "
                        "pass --resume to continue it, or --overwrite to start over (its checkpoints are deleted)")


def disk_full(error: BaseException, output_dir: str | Path) -> UserError | None:
    """Return the user error for ``error`` if it says the disk holding ``output_dir`` is full (``ENOSPC``, or a
    library's message saying so), naming the path and the space a checkpoint takes; None for any other error."""
    import errno

    if not ((isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)):
        return None
    sizes = [sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for f in checkpoint_folders(output_dir)]
    need = f" (a checkpoint here takes {max(sizes) / 2**20:.1f} MiB, and {KEEP} are kept)" if sizes else ""
    return UserError(f"no space left on the device of {getattr(error, 'filename', None) or output_dir} while "
                     f"training{need}. Free some space, then rerun with --resume: it continues from the newest "
                     "intact checkpoint")


class ManifestCallback(TrainerCallback):
    """Writes each checkpoint's manifest once the Trainer and every callback before this one have saved their files
    (keep it last in the callback list: SPF's state is saved in ``on_save`` too). Launched as several processes, it
    waits until every process has written its own files (its RNG state) before the main one writes the manifest."""

    def on_save(self, args, state, control, **kwargs):
        from safeft.distributed import barrier

        barrier()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_manifest(folder)
