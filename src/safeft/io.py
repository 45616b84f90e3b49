"""Output directories written safely (a locked temporary sibling renamed into place), atomic files and the write lock:
the low-level file helpers every command, recipe and method uses."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from safeft.errors import UserError

MARKER = "safeft-output.json"  # written last into every finished output directory: what wrote it, and when
FINISHED = (MARKER, "align.json")  # either marks a finished safeft output (aligned models predate the marker)
INCOMPLETE = "INCOMPLETE"  # inside ``<out>.partial`` while a command writes it


def check_output(out: str | Path, *, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Return ``out`` as a Path once it is safe to write there later; raise otherwise (before any work is done).

    Refuses an ``out`` that is, contains or lies inside one of ``inputs`` (the run would replace what it reads), an
    existing file, a non-empty directory without ``overwrite``, a non-empty directory that no safeft command
    finished (no ``safeft-output.json``: it may hold anything) and a parent directory that cannot be written.
    """
    out = Path(out)
    resolved = out.resolve()
    for item, source in _existing(inputs):
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise UserError(f"--out {out} would overwrite the input {item}; choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        if not any((out / name).exists() for name in FINISHED):
            raise FileExistsError(f"{out} was not written by a finished safeft command (no {MARKER}); --overwrite "
                                  "only replaces safeft outputs. Choose another --out or remove it yourself")
    _check_writable(out, _existing_parent(resolved))
    return out


def check_output_file(out: str | Path, *, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Return ``out`` (a file to write) once it is safe to write it; raise otherwise (before any work is done).

    Refuses an ``out`` that is one of ``inputs`` or an existing file inside an input directory (a new file beside
    a model's files is fine), a directory, an existing file without ``overwrite`` and an unwritable directory.
    """
    out = Path(out)
    resolved = out.resolve()
    for item, source in _existing(inputs):
        if resolved == source or (out.exists() and resolved.is_relative_to(source)):
            raise UserError(f"--out {out} would overwrite the input {item}; choose another --out")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file path such as {out / 'eval.json'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    _check_writable(out, _existing_parent(resolved.parent))
    return out


def check_not_input(out: str | Path, inputs: Sequence[str | Path | None]) -> None:
    """Raise ``UserError`` if ``out`` is, contains or lies inside one of ``inputs`` (writing there would change
    what a run reads: a model folder, a data file)."""
    resolved = Path(out).resolve()
    for item, source in _existing(inputs):
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise UserError(f"--out {out} would overwrite the input {item}; choose an --out outside it")


def _existing(inputs: Sequence[str | Path | None]) -> Iterator[tuple[str | Path, Path]]:
    """Yield ``(as given, resolved path)`` for each input path that exists (None and hub ids are skipped)."""
    for item in inputs:
        if item is not None and Path(item).exists():
            yield item, Path(item).resolve()


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def _check_writable(out: Path, parent: Path) -> None:
    """Raise ``UserError`` naming ``--out`` unless a file can be created in ``parent`` (the nearest existing folder
    of ``out``), found by creating and removing one: permission bits do not tell (``/proc``, a read-only mount, a
    file where a folder is needed), and the run must learn it before any work is done."""
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write --out {out}: {parent} is not writable; choose another --out")
    blocking = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"cannot write --out {out}: {blocking} is a file, not a folder; choose another --out")
    try:
        handle, probe = tempfile.mkstemp(dir=parent, prefix=".safeft-write-check-")
    except OSError as error:
        raise UserError(f"cannot write --out {out}: {parent} does not take new files ({error.strerror}); choose "
                        "another --out") from None
    os.close(handle)
    os.unlink(probe)


@contextmanager
def writing(out: str | Path, *, overwrite: bool, inputs: Sequence[str | Path | None] = (), command: str = "",
            keep_partial: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling ``<out>.partial`` to write into; rename it to ``out`` when the block succeeds.

    ``out`` is checked first (:func:`check_output`) and locked (``.<name>.lock``, holding the writer's pid) so a
    second writer is refused. The partial directory carries an ``INCOMPLETE`` file until the end; on success it
    gets ``safeft-output.json`` (the command, the safeft version, the time), and only then replaces ``out`` (an
    old safeft output is removed after the rename). If the block raises, ``out`` is untouched; the partial
    directory stays, marked, after an interruption (KeyboardInterrupt, a kill) or when it holds a checkpoint to
    resume from, and is removed after any other error. An earlier partial is removed on entry unless
    ``keep_partial``.
    """
    from safeft import __version__

    out = check_output(out, overwrite=overwrite, inputs=inputs)
    partial = out.with_name(out.name + ".partial")
    with locked(out):
        if partial.exists() and not (partial / INCOMPLETE).exists():
            raise FileExistsError(f"{partial} exists and is not a safeft partial output; remove or rename it")
        if partial.exists() and not keep_partial:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        write_json(partial / INCOMPLETE, {"command": command, "pid": os.getpid(), "started": _now(),
                                          "note": f"an unfinished safeft run; the finished output goes to {out}"})
        try:
            yield partial
        except BaseException as error:
            # an error (bad input, divergence) leaves no trace unless there is a checkpoint to resume from; an
            # interruption (Ctrl-C, a kill) leaves the partial output, marked INCOMPLETE
            resumable = any(partial.glob("trainer/checkpoint-*"))
            if (isinstance(error, Exception) and not resumable) or [p.name for p in partial.iterdir()] == [INCOMPLETE]:
                shutil.rmtree(partial)
            raise
        write_json(partial / MARKER, {"format": "safeft.output/1", "command": command, "safeft_version": __version__,
                                      "finished": _now()})
        (partial / INCOMPLETE).unlink()
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing_together(out: str | Path, **kwargs) -> Iterator[Path]:
    """:func:`writing` for a run launched as several processes (torchrun, accelerate): the main process checks,
    locks and in the end renames the output; every process gets the same partial directory, any error of the main
    process is raised in all of them, and the rename waits until all are done. In one process: :func:`writing`."""
    from safeft import distributed

    if distributed.world_size() <= 1:
        with writing(out, **kwargs) as tmp:
            yield tmp
        return
    distributed.init()
    if not distributed.is_main_process():
        distributed.share_error(None)
        yield Path(out).with_name(Path(out).name + ".partial")
        distributed.barrier()
        return
    context = writing(out, **kwargs)
    try:
        tmp = context.__enter__()
    except Exception as error:  # bad --out and the like: every process stops with the same message
        distributed.share_error(error)
        raise
    distributed.share_error(None)
    try:
        yield tmp
        distributed.barrier()  # every process has finished writing before the output is renamed into place
    except BaseException as error:
        if not context.__exit__(type(error), error, error.__traceback__):
            raise
    else:
        context.__exit__(None, None, None)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the write lock of ``out`` (``.<name>.lock`` beside it, holding this pid) for the block; raise
    ``FileExistsError`` if a live process holds it (a lock left by a dead one is taken over)."""
    lock = out.with_name(f".{out.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = lock.read_text().strip()
            if not holder:  # created this instant, its pid not written yet
                time.sleep(0.2)
                holder = lock.read_text().strip()
            if holder.isdigit() and _alive(int(holder)):
                raise FileExistsError(f"another safeft run (pid {holder}) is writing {out}; wait for it to end or "
                                      "choose another --out") from None
            lock.unlink(missing_ok=True)  # its writer is gone: a stale lock
    else:
        raise FileExistsError(f"could not lock {out} ({lock}); another run may be starting")
    try:
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a reader, or a writer killed midway, sees the old file or the
    new one, never a part. The file gets the mode a plain ``open`` would give it (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: others on the machine could not read results
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def fill_defaults(recorded: dict, expected: dict, defaults: dict) -> None:
    """Give ``recorded`` (a run's settings as a file holds them) the defaults of the options it lacks, in place.

    An option a file lacks was added to safeft after it was written, and had its default then. ``defaults`` maps a
    key of the record to the dataclass instance holding that part's defaults; only the options ``expected`` (the
    record as this version writes it) has for that key are filled, as JSON values."""
    from dataclasses import asdict

    for key, instance in defaults.items():
        if isinstance(recorded.get(key), dict) and isinstance(expected.get(key), dict):
            filled = {k: v for k, v in json.loads(json.dumps(asdict(instance))).items() if k in expected[key]}
            recorded[key] = {**filled, **recorded[key]}
