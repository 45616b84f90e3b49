"""Outputs are written safely: into a locked temporary sibling, renamed into place only when the command succeeds."""

import os
import subprocess
import sys

import pytest

from safeft.io import INCOMPLETE, MARKER, check_output, check_output_file, writing


def tree(path) -> dict[str, bytes]:
    """Return every file under ``path`` with its bytes (what "unchanged byte for byte" compares)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def finished_output(path, text="old"):
    with writing(path, overwrite=True) as tmp:
        (tmp / "result.txt").write_text(text)
    return path


def test_success_renames_the_partial_output_into_place_with_a_marker(tmp_path):
    out = finished_output(tmp_path / "out", "new")
    assert (out / "result.txt").read_text() == "new" and (out / MARKER).exists()
    assert not (out / INCOMPLETE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial, no lock, no old copy left


def test_a_failed_run_leaves_the_old_output_untouched_and_the_partial_one_marked(tmp_path):
    out = finished_output(tmp_path / "out")
    before = tree(out)
    with pytest.raises(KeyboardInterrupt), writing(out, overwrite=True, command="safeft finetune ...") as tmp:
        (tmp / "result.txt").write_text("half")
        assert tree(out) == before  # the old output is still whole while the new one is written
        raise KeyboardInterrupt
    assert tree(out) == before
    partial = tmp_path / "out.partial"
    assert (partial / INCOMPLETE).exists() and "safeft finetune" in (partial / INCOMPLETE).read_text()
    assert not (tmp_path / ".out.lock").exists()
    finished_output(out, "again")  # the next run clears the stale partial output
    assert (out / "result.txt").read_text() == "again" and not partial.exists()


def test_overwrite_is_needed_and_replaces_only_safeft_outputs(tmp_path):
    out = finished_output(tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output(out, overwrite=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not written by a finished safeft command"):
        check_output(foreign, overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="is a file"):
        check_output(foreign / "thesis.tex", overwrite=True)


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_an_output_never_replaces_an_input(tmp_path, relation):
    model = finished_output(tmp_path / "model")
    out = {"same": model, "inside": model / "sub", "contains": tmp_path}[relation]
    with pytest.raises(ValueError, match="would overwrite the input"):
        check_output(out, overwrite=True, inputs=[model])


def test_output_files_never_replace_input_files(tmp_path):
    model = finished_output(tmp_path / "model")
    check_output_file(model / "eval.json", overwrite=False, inputs=[model])  # a new file beside the model: fine
    with pytest.raises(ValueError, match="would overwrite the input"):
        check_output_file(model / "result.txt", overwrite=True, inputs=[model])
    with pytest.raises(IsADirectoryError, match="give a file path"):
        check_output_file(model, overwrite=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_file(model / "result.txt", overwrite=False)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    with writing(out, overwrite=False) as tmp, pytest.raises(FileExistsError, match=rf"pid {os.getpid()}"):
        (tmp / "a").write_text("first")
        with writing(out, overwrite=True):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.lock").write_text(dead.stdout.strip())  # its writer has exited
    finished_output(out, "second")
    assert (out / "result.txt").read_text() == "second"


def test_an_error_leaves_no_partial_output_unless_it_can_be_resumed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError), writing(out, overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
        raise ValueError("diverged")
    assert not (tmp_path / "out.partial").exists() and not out.exists()
    with pytest.raises(MemoryError), writing(out, overwrite=False) as tmp:
        (tmp / "trainer" / "checkpoint-100").mkdir(parents=True)
        raise MemoryError
    assert (tmp_path / "out.partial" / INCOMPLETE).exists()  # a checkpoint to resume from is kept
