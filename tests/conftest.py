"""Shared fixtures: a tiny random Llama, a byte tokenizer with a chat template, and small chat batches.

``pytest -q`` runs the fast offline unit and property tests; ``pytest -q --all`` also runs the tests marked
``slow`` (they start processes: torchrun, spawned workers, benches, the example scripts) and ``integration`` (the
real default model, converted once and cached).
"""

import faulthandler
import time

import pytest
import torch
import torch.multiprocessing as mp

from safeft.chat import collate, encode_chat
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, save_tiny_model, tiny_llama

BENIGN_PAIRS = [
    ("Summarise: the cat sat on the mat.", "A cat sat on a mat."),
    ("What is two plus three?", "Two plus three is five."),
    ("Name a colour of the sky.", "The sky is often blue."),
    ("Translate 'bonjour' to English.", "It means hello."),
]


def _watched(rank, worker, seconds, *args):
    faulthandler.dump_traceback_later(seconds, exit=True)  # a stuck worker prints where it is stuck, then exits
    worker(rank, *args)
    faulthandler.cancel_dump_traceback_later()


def spawn_workers(worker, args, nprocs=2, deadline_seconds=240):
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; re-raise a worker's error, and fail the test
    (killing the workers) if they have not all finished after ``deadline_seconds`` instead of hanging the suite;
    a worker still running 30 s before that prints its threads' stacks first."""
    context = mp.start_processes(_watched, args=(worker, deadline_seconds - 30, *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    give_up = time.monotonic() + deadline_seconds
    while not context.join(timeout=5):
        if time.monotonic() > give_up:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} spawned workers still running after {deadline_seconds} s: a stuck rendezvous or "
                        "collective; rerun the test alone")


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", help="also run the slow and integration tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    heavy = [item for item in items if item.get_closest_marker("slow") or item.get_closest_marker("integration")]
    if heavy:
        config.hook.pytest_deselected(items=heavy)
        items[:] = [item for item in items if item not in heavy]


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and its byte tokenizer saved as a model directory (what the CLI and recipes load)."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """Another tiny random Llama of the same shapes: the "unaligned" model ``tiny_dir`` stands for the alignment of."""
    path = tmp_path_factory.mktemp("tiny_base")
    save_tiny_model(path, seed=1)
    return path


@pytest.fixture(scope="session")
def benign_batch(tokenizer):
    return collate([encode_chat(tokenizer, p, r) for p, r in BENIGN_PAIRS], tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def safety_pairs():
    return SAFETY_PAIRS


def train_steps(model, optimizer, batch, steps: int) -> None:
    """Run a few plain training steps on one batch (loss on response tokens)."""
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def seeded_torch():
    """Seed torch's global generator before every test, so no outcome depends on test order or the run."""
    torch.manual_seed(0)
