"""Every ```python block of README.md and docs/**/*.md runs on a tiny random model (issue 38).

``"path/to/aligned-model"`` and ``"path/to/base-model"`` in a block stand for a model directory; here both are a
tiny random Llama (hidden 256, so that the default rank 128 fits every matrix; seed 3, which answers enough
built-in harmful requests for a 10% mix) with a byte tokenizer. A block preceded by ``<!-- skip-test: reason -->``
is skipped (only where it cannot run offline: a Hub upload); a block that calls ``bench(`` starts processes and is
marked slow. Identical blocks (README and a guide) run once.
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:<!-- skip-test: (?P<skip>[^>]+?) -->\n)?```python\n(?P<code>.*?)^```",
                   re.DOTALL | re.MULTILINE)
PLACEHOLDERS = ("path/to/aligned-model", "path/to/base-model")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """Return ``(line, code, skip reason or None)`` for every ```python block of a markdown text."""
    return [(text[:m.start("code")].count("\n") + 1, m.group("code"), m.group("skip")) for m in FENCE.finditer(text)]


def _params():
    seen, params = set(), []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for line, code, skip in python_blocks(page.read_text()):
            if code in seen:
                continue
            seen.add(code)
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            marks += [pytest.mark.slow] if "bench(" in code else []
            params.append(pytest.param(f"{page.relative_to(ROOT)}:{line}", code, marks=marks,
                                       id=f"{page.relative_to(ROOT)}:{line}"))
    return params


@pytest.fixture(scope="module")
def docs_model(tmp_path_factory):
    from safeft.testing import byte_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("docs-model")
    tiny_llama(seed=3, hidden=256).save_pretrained(path)  # seed 3 answers enough harmful requests for a 10% mix
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def registry_kept():
    """A block may register a method; the registry is put back afterwards."""
    from safeft.methods import REGISTRY

    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


def run_block(where: str, code: str, model_dir: Path, cwd: Path) -> dict:
    """Run ``code`` as a script (``__name__ == "__main__"``) in ``cwd`` with the placeholders replaced by
    ``model_dir``; return its globals."""
    for placeholder in PLACEHOLDERS:
        code = code.replace(placeholder, str(model_dir))
    namespace = {"__name__": "__main__"}
    before = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, where, "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace


def test_blocks_are_found_with_their_skip_reason():
    blocks = [p.values[1] for p in _params()]
    assert len(blocks) >= 6
    assert python_blocks("<!-- skip-test: no network -->\n```python\nx = 1\n```\n") == [(3, "x = 1\n", "no network")]


@pytest.mark.parametrize("where, code", _params())
def test_block_runs(where, code, docs_model, tmp_path, monkeypatch, registry_kept):
    monkeypatch.setenv("SAFEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_block(where, code, docs_model, tmp_path)


def test_a_broken_block_fails(docs_model, tmp_path):
    broken = "from safeft import SPFConfig\n\nconfig = SPFConfig(rank=-1)\n"
    with pytest.raises(ValueError, match="rank"):
        run_block("broken.md:1", broken, docs_model, tmp_path)
    with pytest.raises(NameError, match="subspace"):
        run_block("incomplete.md:1", "print(subspace)\n", docs_model, tmp_path)
