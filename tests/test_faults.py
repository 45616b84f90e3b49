"""Kill it anywhere: a run interrupted at any point (between steps, between the files of a checkpoint, inside one, or
with a file of its newest checkpoint damaged afterwards) resumes until done and ends with the weights, SPF metrics
and log of the uninterrupted run, and nothing outside ``<out>.partial`` changes on the way.

Each kill point is a test id: ``pytest -q tests/test_faults.py -k "spf and torn"``. The interruption is raised in
process (a ``KeyboardInterrupt`` where the kill would land, as a kill leaves the disk); the tests marked ``slow`` kill
a child process with SIGKILL instead. Run as a script, this file is that child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainerCallback

import safeft.checkpoints
from safeft.checkpoints import MANIFEST, check_checkpoint, checkpoint_folders
from safeft.config import TrainConfig
from safeft.data.examples import ChatExample
from safeft.errors import UserError
from safeft.io import INCOMPLETE, writing, writing_together
from safeft.spf import STATE_FILE, SafetySubspace, SPFCallback, SPFConfig
from safeft.spf.projector import SPFProjector
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, tiny_llama
from safeft.train import prepare_model, train

STEPS, SAVE_EVERY = 8, 2
PAIRS = [("Summarise: the cat sat on the mat.", "A cat sat on a mat."),
         ("What is two plus three?", "Two plus three is five."),
         ("Name a colour of the sky.", "The sky is often blue."),
         ("Translate 'bonjour' to English.", "It means hello."),
         ("Is fire hot?", "Yes, fire is hot."),
         ("Count to three.", "One, two, three.")]
EXAMPLES = [ChatExample(({"role": "user", "content": p}, {"role": "assistant", "content": r})) for p, r in PAIRS * 2]
SCENARIOS = {"sft": 0, "spf": 0, "lora": 2}  # name: LoRA rank
# SPF with a nonzero drift (left side, grad), a monitor interval that straddles checkpoints and a refresh at step 5,
# so that the step count, drift, monitor sums and the refreshed subspace all have to come back from a checkpoint
SPF = SPFConfig(rank=4, side="left", mode="conflict", project="grad", monitor_every=3, refresh_every=5)
METRICS = ("spf/conflict_rate", "spf/removed_norm", "spf/safety_drift", "spf/safety_loss", "spf/refreshes")


def config(scenario: str) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=2, save_every=SAVE_EVERY, learning_rate=1e-3, logging_steps=1,
                       lora_r=SCENARIOS[scenario], report_to="none")


_subspace: dict[str, SafetySubspace] = {}


def build(scenario: str):
    """Return ``(model, tokenizer, callbacks)`` for a fresh start of ``scenario`` (the same every time)."""
    tokenizer = byte_tokenizer()
    model = prepare_model(tiny_llama(seed=0), config(scenario))
    if scenario != "spf":
        return model, tokenizer, []
    if "spf" not in _subspace:
        _subspace["spf"] = SafetySubspace.estimate(model, tokenizer, SAFETY_PAIRS[:2], SPF, show_progress=False)
    return model, tokenizer, [SPFCallback(_subspace["spf"], SPF, tokenizer)]


def run(scenario: str, out: Path, *, resume: bool = False, extra=()) -> tuple[torch.nn.Module, dict]:
    """Train ``scenario`` into ``out`` the way ``safeft finetune`` does (in ``<out>.partial``, renamed when done;
    launched as several processes, every one of them trains and the main one writes the output)."""
    model, tokenizer, callbacks = build(scenario)
    with writing_together(out, overwrite=True, keep_partial=resume, command="test") as partial:
        log = train(model, tokenizer, EXAMPLES, config(scenario), output_dir=str(partial / "trainer"),
                    callbacks=[*callbacks, *extra], resume=resume)
    return model, log


class KillAfterStep(TrainerCallback):
    """Interrupts right after optimizer step ``at`` (before that step's log and checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def _path(args, kwargs, index: int, key: str) -> Path:
    return Path(kwargs.get(key, args[index] if len(args) > index else ""))


# every function that writes a file of a checkpoint (or changes the set of checkpoints), and the path it writes
WRITERS = [
    (torch, "save", lambda a, k: _path(a, k, 1, "f")),  # optimizer, scheduler, RNG state, training args
    (transformers.modeling_utils, "safe_save_file", lambda a, k: _path(a, k, 1, "filename")),  # full weights
    ("peft.peft_model", "safe_save_file", lambda a, k: _path(a, k, 1, "filename")),  # LoRA adapter
    (transformers.trainer_callback.TrainerState, "save_to_json", lambda a, k: _path(a, k, 1, "json_path")),
    (SPFProjector, "save_state", lambda a, k: _path(a, k, 1, "folder") / STATE_FILE),
    (safeft.checkpoints, "write_manifest", lambda a, k: _path(a, k, 0, "folder") / MANIFEST),
    (transformers.trainer, "rotate_checkpoints", lambda a, k: Path("rotation")),
]


@contextmanager
def writes(on_write):
    """Call ``on_write(path, write)`` instead of each checkpoint writer of :data:`WRITERS` (``write()`` does the
    write); the rotation of old checkpoints is reported as the path ``rotation`` inside the latest checkpoint."""
    import importlib

    latest = {"folder": Path()}

    def wrap(original, where):
        def writer(*args, **kwargs):
            path = where(args, kwargs)
            if path.name == "rotation":
                path = latest["folder"] / "rotation"
            elif path.parent.name.startswith("checkpoint-"):
                latest["folder"] = path.parent
            else:
                return original(*args, **kwargs)
            return on_write(path, lambda: original(*args, **kwargs))
        return writer

    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for owner, name, where in WRITERS:
            owner = importlib.import_module(owner) if isinstance(owner, str) else owner
            patch.setattr(owner, name, wrap(getattr(owner, name), where))
        yield


def kill_at(checkpoint: str, name: str, torn: bool = False):
    """Return an ``on_write`` for :func:`writes` that interrupts before ``name`` of ``checkpoint`` is written or,
    ``torn``, after half of it is."""
    def on_write(path: Path, write):
        if (path.parent.name, path.name) != (checkpoint, name):
            return write()
        if torn:  # the kill lands inside the write: half the file is on disk
            write()
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise KeyboardInterrupt
    return on_write


CHECKPOINT_FILES = {  # what each scenario writes into a checkpoint, in order (what test_checkpoint_writes checks)
    "sft": ["model.safetensors", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "rotation", MANIFEST],
    "lora": ["adapter_model.safetensors", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
             "trainer_state.json", "rotation", MANIFEST],
}
CHECKPOINT_FILES["spf"] = [*CHECKPOINT_FILES["sft"][:-1], STATE_FILE, MANIFEST]
# the files a truncation damages: every file the newest checkpoint holds (the weights' name differs under LoRA)
DAMAGED = ["weights", "config", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
           "training_args.bin", "tokenizer.json", MANIFEST]


def kill_points() -> list:
    points = [(f"after-step-{k}", k) for k in range(1, STEPS + 1)]
    points += [(f"after-manifest-{k}", k) for k in (2, 6)]
    points += [(f"before-{name}", name) for name in CHECKPOINT_FILES["spf"]]
    points += [(f"torn-{name}", name) for name in ("model.safetensors", "optimizer.pt", STATE_FILE)]
    points += [(f"truncated-{name}", name) for name in DAMAGED]
    points += [("overwritten-bytes-weights", "weights"), ("twice-3-and-7", (3, 7)), ("spf-state-missing", STATE_FILE)]
    return points


def _weights_name(scenario: str) -> str:
    return "adapter_model.safetensors" if SCENARIOS[scenario] else "model.safetensors"


def file_name(scenario: str, what: str) -> str:
    """Return the file a kill point names: ``weights`` and ``config`` are the model's or the LoRA adapter's."""
    lora = SCENARIOS[scenario]
    return {"weights": _weights_name(scenario), "config": "adapter_config.json" if lora else "config.json"}.get(what,
                                                                                                               what)


def tree(root: Path, skip: Path) -> dict[str, bytes]:
    """Return every file under ``root`` except those under ``skip``, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_relative_to(skip)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these runs are tiny, and on a busy CPU more threads make each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(one_thread, tmp_path_factory):
    """The uninterrupted run of each scenario: ``{scenario: (state dict, log history)}``."""
    done = {}
    for scenario in SCENARIOS:
        model, log = run(scenario, tmp_path_factory.mktemp(scenario) / "out")
        done[scenario] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, log["log_history"])
    return done


def assert_same_run(model, log, reference) -> None:
    weights, history = reference
    for key, value in model.state_dict().items():
        assert torch.allclose(value, weights[key], atol=1e-6, rtol=0), key
    assert len(log["log_history"]) == len(history)
    for got, want in zip(log["log_history"], history, strict=True):
        for key in ("step", "loss", *METRICS):
            if key in want:
                assert got.get(key) == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)


def damage(path: Path, kind: str) -> None:
    """Damage one file of a checkpoint: ``truncated`` (half of it), ``overwritten`` (16 bytes changed, the same
    size: only the hash tells) or ``missing``."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "overwritten":
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 16] = b"\x7f" * 16
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def interrupt(scenario: str, out: Path, point: str, what) -> None:
    """Run ``scenario`` into ``out`` and interrupt it at the kill point ``point`` (damage included)."""
    trainer = out.with_name(out.name + ".partial") / "trainer"
    kind = point.split("-")[0]
    with pytest.raises(KeyboardInterrupt):
        if kind == "after" and point.startswith("after-step"):
            run(scenario, out, extra=[KillAfterStep(what)])
        elif kind == "after":
            with writes(_after_manifest(what)):
                run(scenario, out)
        elif kind in ("before", "torn"):
            with writes(kill_at("checkpoint-4", what, torn=kind == "torn")):
                run(scenario, out)
        elif kind == "twice":
            run(scenario, out, extra=[KillAfterStep(what[0])])
        else:  # damage a file of the newest checkpoint after the run was killed
            run(scenario, out, extra=[KillAfterStep(5)])
    if kind == "twice":
        with pytest.raises(KeyboardInterrupt):
            run(scenario, out, resume=True, extra=[KillAfterStep(what[1])])
    if kind in ("truncated", "overwritten", "spf"):
        newest = trainer / "checkpoint-4"
        path = newest / file_name(scenario, what)
        damage(path, {"spf": "missing"}.get(kind, kind))


def _after_manifest(step: int):
    def on_write(path: Path, write):
        result = write()
        if (path.parent.name, path.name) == (f"checkpoint-{step}", MANIFEST):
            raise KeyboardInterrupt
        return result
    return on_write


def resume_until_done(scenario: str, out: Path):
    """Resume ``scenario`` as a user would: with ``--resume``, or afresh where there is nothing to resume yet."""
    try:
        return run(scenario, out, resume=True)
    except FileNotFoundError as error:
        assert "nothing to resume" in str(error)
        return run(scenario, out)


def applies(scenario: str, point: str, what) -> bool:
    """Whether the kill point exists in ``scenario`` (SPF's state file only in SPF, the weights' name by LoRA)."""
    if what == STATE_FILE:
        return scenario == "spf"
    if isinstance(what, str) and what.endswith(".safetensors") and point.startswith(("before", "torn")):
        return what == _weights_name(scenario)
    return True


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("point,what", [pytest.param(p, w, id=p) for p, w in kill_points()])
def test_killed_anywhere_the_resumed_run_ends_as_the_uninterrupted_one(uninterrupted, tmp_path, scenario, point,
                                                                       what):
    if not applies(scenario, point, what):
        if point.startswith(("before", "torn")) and what == "model.safetensors":
            what = _weights_name(scenario)  # the same kill point: before the weights are written
        else:
            pytest.skip(f"no {what} in a {scenario} checkpoint")
    out = tmp_path / "out"
    with writing(out, overwrite=False) as earlier:  # an earlier finished output in --out, and a file beside it:
        (earlier / "model.safetensors").write_bytes(b"earlier run")  # neither may change until the run ends
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path, out.with_name("out.partial"))
    interrupt(scenario, out, point, what)
    partial = out.with_name("out.partial")
    assert (partial / INCOMPLETE).exists() and tree(tmp_path, partial) == before
    model, log = resume_until_done(scenario, out)
    assert_same_run(model, log, uninterrupted[scenario])
    assert not partial.exists() and not (out / "model.safetensors").exists() and (out / "trainer").is_dir()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    kept = checkpoint_folders(out / "trainer")
    assert [f.name for f in kept] == [f"checkpoint-{STEPS}", f"checkpoint-{STEPS - SAVE_EVERY}"]
    assert not any(check_checkpoint(f) for f in kept)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_checkpoint_writes_are_the_ones_the_kill_points_cover(tmp_path, scenario):
    seen = []

    def record(path, write):
        if path.parent.name == "checkpoint-4":
            seen.append(path.name)
        return write()

    with writes(record):
        run(scenario, tmp_path / "out")
    assert seen == CHECKPOINT_FILES[scenario]
    names = {p.name for p in (tmp_path / "out" / "trainer" / f"checkpoint-{STEPS}").iterdir()}
    assert {file_name(scenario, n) for n in DAMAGED} <= names


@pytest.mark.parametrize("broken", ["one-checkpoint-kept", "no-manifest-check"])
def test_the_harness_fails_when_the_fallback_is_broken(uninterrupted, tmp_path, monkeypatch, broken):
    """The kill points can fail: with the fallback broken on purpose, a damaged newest checkpoint no longer ends as
    the uninterrupted run (so the passing harness above says something)."""
    from safetensors import SafetensorError

    import safeft.train

    if broken == "one-checkpoint-kept":
        monkeypatch.setattr(safeft.train, "KEEP", 1)  # nothing left to fall back to
    else:
        monkeypatch.setattr(safeft.checkpoints, "check_checkpoint", lambda folder: [])  # every checkpoint "intact"
    out = tmp_path / "out"
    interrupt("sft", out, "truncated-weights", "weights")
    with pytest.raises((UserError, AssertionError, SafetensorError)) as error:  # never a silent pass
        model, log = resume_until_done("sft", out)
        assert_same_run(model, log, uninterrupted["sft"])
    if broken == "one-checkpoint-kept":
        assert "no intact checkpoint" in str(error.value)


def test_with_every_checkpoint_damaged_resume_names_the_files_and_the_choices(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run("sft", out, extra=[KillAfterStep(5)])
    trainer = out.with_name("out.partial") / "trainer"
    for folder in checkpoint_folders(trainer):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError) as error:
        run("sft", out, resume=True)
    message = str(error.value)
    assert "no intact checkpoint" in message and "checkpoint-4: model.safetensors has 100 bytes" in message
    assert "checkpoint-2: model.safetensors" in message and "--overwrite" in message and "--resume-from" in message
    assert len(checkpoint_folders(trainer)) == 2  # nothing removed: the user chooses


def test_resume_reports_the_fallback_in_one_line(tmp_path, caplog):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run("sft", out, extra=[KillAfterStep(5)])
    weights = out.with_name("out.partial") / "trainer" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="safeft"):
        run("sft", out, resume=True)
    lines = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "checkpoint-2 (step 2), the newest intact checkpoint" in lines[0]
    assert "checkpoint-4 is damaged (model.safetensors has 100 bytes" in lines[0]


def test_a_full_disk_is_a_user_error_naming_the_path_and_the_run_resumes_once_there_is_space(uninterrupted,
                                                                                               tmp_path):
    import errno

    out = tmp_path / "out"

    def full(path, write):
        if path.parent.name == "checkpoint-6" and path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write()

    with writes(full), pytest.raises(UserError) as error:
        run("sft", out)
    message = str(error.value)
    assert "no space left on the device of" in message and "checkpoint-6/optimizer.pt" in message
    assert "MiB" in message and "--resume" in message
    partial = out.with_name("out.partial")
    assert (partial / INCOMPLETE).exists()  # kept: it holds a checkpoint to resume from
    model, log = run("sft", out, resume=True)
    assert_same_run(model, log, uninterrupted["sft"])


# --- a real kill: SIGKILL of a child process -----------------------------------------------------------------------


def _child(scenario: str, out: str, point: str) -> None:
    """In a child process: train ``scenario`` into ``out`` and SIGKILL itself at ``point``."""
    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    if point.startswith("after-step-"):
        class Die(KillAfterStep):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == self.at:
                    die()

        run(scenario, Path(out), extra=[Die(int(point.rsplit("-", 1)[1]))])
    else:  # before-<file>: killed between two files of checkpoint-4
        name = point.removeprefix("before-")

        def on_write(path, write):
            if (path.parent.name, path.name) == ("checkpoint-4", name):
                die()
            return write()

        with writes(on_write):
            run(scenario, Path(out))


@pytest.mark.slow
@pytest.mark.parametrize("scenario,point", [("spf", "after-step-5"), ("sft", "before-optimizer.pt"),
                                            ("lora", "before-trainer_state.json")])
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(uninterrupted, tmp_path, scenario, point):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(safeft.checkpoints.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, __file__, scenario, str(out), point], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (out.with_name("out.partial") / INCOMPLETE).exists()
    model, log = run(scenario, out, resume=True)
    assert_same_run(model, log, uninterrupted[scenario])


def _cli_child(kill_at: str, *args: str) -> None:
    """In each process of a torchrun launch: ``safeft finetune *args``, every process SIGKILLing itself after step
    ``kill_at`` (0: never)."""
    import safeft.methods.sft
    from safeft.cli import app

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    safeft.methods.sft.SFT.callbacks = lambda self, *a: [Die()]
    sys.argv = ["safeft", "finetune", *args]
    app()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["none", "truncated-weights"])
def test_a_sigkilled_two_process_run_resumes_to_the_uninterrupted_weights(tiny_dir, tmp_path, damage):
    import shutil

    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(safeft.checkpoints.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    common = ["--model", str(tiny_dir), "--task", "sentiment", "--max-train", "16", "--steps", "6", "--batch-size",
              "2", "--save-every", "2", "--learning-rate", "1e-3"]

    def launch(out: str, kill_at: int, *extra: str):
        return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(29530 + kill_at), __file__,
                               "cli", str(kill_at), *common, "--out", out, *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)

    full = launch("full", 0)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = launch("run", 5)
    assert killed.returncode != 0 and (tmp_path / "run.partial" / INCOMPLETE).exists(), killed.stderr[-3000:]
    trainer = tmp_path / "run.partial" / "trainer"
    assert not check_checkpoint(trainer / "checkpoint-4")  # every process's files are in the manifest
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (trainer / "checkpoint-4").iterdir()}
    if damage == "truncated-weights":
        weights = trainer / "checkpoint-4" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    resumed = launch("run", 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if damage != "none":
        assert resumed.stderr.count("resuming from") >= 1 and "checkpoint-4 is damaged" in resumed.stderr
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("full", "run"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


# --- two processes: every kill point in one torchrun launch --------------------------------------------------------
# Each process stops where a launch killed at that point leaves it: the process that writes the file named stops
# there (before it, or with half of it written); the other stops when it reaches the same checkpoint's save, its own
# files (its RNG state) written, as it would have gone on until the launcher killed it. Then both resume until done.

DDP_SCENARIO = "spf"
RNG = "rng_state.pth"  # written by every process as rng_state_<rank>.pth


def ddp_kill_points() -> list[tuple[str, object]]:
    points = [(f"after-step-{k}", k) for k in range(1, STEPS + 1)]
    points += [(f"after-manifest-{k}", k) for k in (2, 6)]
    points += [(f"before-{name}", name) for name in CHECKPOINT_FILES[DDP_SCENARIO]]
    points += [(f"torn-{name}", name) for name in ("model.safetensors", RNG, STATE_FILE)]
    points += [(f"truncated-{name}", name) for name in ("weights", "optimizer.pt", "scheduler.pt", "rng_state_0.pth",
                                                         "rng_state_1.pth", "trainer_state.json", MANIFEST)]
    points += [("overwritten-bytes-weights", "weights"), ("missing-rng_state_1.pth", "rng_state_1.pth")]
    return points


class StopAtSave(TrainerCallback):
    """Interrupts in the save of the checkpoint of step ``at``, after the Trainer wrote this process's files and
    before the manifest (the callbacks run ahead of :class:`~safeft.checkpoints.ManifestCallback`)."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@contextmanager
def stop_after_manifest(step: int):
    """Interrupt right after the manifest of checkpoint ``step`` (in every process: the others pass its barrier)."""
    original = safeft.checkpoints.ManifestCallback.on_save

    def on_save(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safeft.checkpoints.ManifestCallback, "on_save", on_save)
        yield


def ddp_interrupt(out: Path, point: str, what, rank: int) -> None:
    """Interrupt this process of a two-process run of :data:`DDP_SCENARIO` at ``point`` (see the section's note)."""
    import torch.distributed as dist

    kind = point.split("-")[0]
    with ExitStack() as stack:
        extra = []
        if point.startswith("after-step"):
            extra = [KillAfterStep(what)]
        elif kind == "after" or (kind in ("before", "torn") and what == MANIFEST):  # written after a barrier
            step = what if kind == "after" else 4
            if rank == 0:
                stack.enter_context(writes(_after_manifest(step) if kind == "after" else kill_at("checkpoint-4",
                                                                                                 MANIFEST)))
            else:
                stack.enter_context(stop_after_manifest(step))
        elif kind in ("before", "torn") and what == RNG:
            stack.enter_context(writes(kill_at("checkpoint-4", f"rng_state_{rank}.pth", torn=kind == "torn")))
        elif kind in ("before", "torn"):  # a file only the main process writes
            if rank == 0:
                stack.enter_context(writes(kill_at("checkpoint-4", what, torn=kind == "torn")))
            else:
                extra = [StopAtSave(4)]
        else:
            extra = [KillAfterStep(5)]
        failed = None
        try:  # every process gets to both barriers below, whatever happened to it
            with pytest.raises(KeyboardInterrupt):
                run(DDP_SCENARIO, out, extra=extra)
        except BaseException as error:  # noqa: BLE001 -- raised after the barriers
            failed = error
    dist.barrier()
    if failed is None and rank == 0 and kind in ("truncated", "overwritten", "missing"):
        try:
            damage(out.with_name(out.name + ".partial") / "trainer" / "checkpoint-4" / file_name(DDP_SCENARIO, what),
                   kind)
        except BaseException as error:  # noqa: BLE001 -- raised after the barrier
            failed = error
    dist.barrier()
    if failed is not None:
        raise failed


def _ddp_harness(workdir: str, result_file: str) -> None:
    """In each process of a two-process torchrun launch: the uninterrupted run, then every kill point of
    :func:`ddp_kill_points`, each resumed until done and compared with it; the main process writes
    ``{point: "ok" or what went wrong, per process}`` to ``result_file``."""
    import datetime
    import json
    import traceback

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    rank, root = dist.get_rank(), Path(workdir)
    model, log = run(DDP_SCENARIO, root / "full" / "out")
    reference = ({k: v.detach().clone() for k, v in model.state_dict().items()}, log["log_history"])
    outcome = {}
    for point, what in ddp_kill_points():
        folder = root / point
        out = folder / "out"
        if rank == 0:
            folder.mkdir()
            with writing(out, overwrite=False) as earlier:  # an earlier output that must not change until the end
                (earlier / "model.safetensors").write_bytes(b"earlier run")
            before = tree(folder, out.with_name("out.partial"))
        dist.barrier()
        try:
            ddp_interrupt(out, point, what, rank)
            partial = out.with_name("out.partial")
            if rank == 0:
                assert (partial / INCOMPLETE).exists(), "no partial output marked incomplete"
                assert tree(folder, partial) == before, "a file outside <out>.partial changed"
            model, log = resume_until_done(DDP_SCENARIO, out)
            assert_same_run(model, log, reference)
            if rank == 0:
                assert not partial.exists() and not (out / "model.safetensors").exists()
                kept = checkpoint_folders(out / "trainer")
                assert [f.name for f in kept] == [f"checkpoint-{STEPS}", f"checkpoint-{STEPS - SAVE_EVERY}"], kept
                assert not any(check_checkpoint(f) for f in kept)
            outcome[point] = "ok"
        except BaseException as error:  # noqa: BLE001 -- reported per kill point; the test fails on any
            outcome[point] = "".join(traceback.format_exception_only(error)).strip()[-800:]
        print(f"rank {rank} {point}: {outcome[point]}", file=sys.stderr, flush=True)
        dist.barrier()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, outcome)
    if rank == 0:
        Path(result_file).write_text(json.dumps({p: [o[p] for o in every] for p in outcome}, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_two_process_run_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path):
    import json
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(safeft.checkpoints.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    result = tmp_path / "result.json"
    launch = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29561", __file__, "ddp",
                             str(tmp_path), str(result)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert launch.returncode == 0 and result.exists(), launch.stderr[-4000:]
    outcome = json.loads(result.read_text())
    assert len(outcome) >= 20 and list(outcome) == [p for p, _ in ddp_kill_points()]
    failed = {point: ranks for point, ranks in outcome.items() if ranks != ["ok", "ok"]}
    assert not failed, failed


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        _cli_child(*sys.argv[2:])
    elif sys.argv[1] == "ddp":
        _ddp_harness(*sys.argv[2:4])
    else:
        _child(*sys.argv[1:4])
