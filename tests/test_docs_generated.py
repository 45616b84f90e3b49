"""The results pages and the README's headline table are generated from the committed JSON (issue 36): a committed
page that differs from what ``python benchmarks/report.py`` writes fails here, so a number edited by hand does."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("docs_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_are_what_the_generator_writes(report):
    stale = [str(p.relative_to(ROOT)) for p in report.stale()]
    assert not stale, f"{stale} differ from the committed JSON's pages: run python benchmarks/report.py"


def test_every_results_page_and_the_readme_hold_generated_blocks(report):
    pages = set(report.pages())
    assert ROOT / "README.md" in pages
    assert set((ROOT / "docs" / "results").glob("*.md")) <= pages


def test_a_number_edited_by_hand_is_caught(report):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- generated: headline bench -->")
    edited = readme[:start] + readme[start:].replace("95.8 / 86.7", "15.8 / 86.7", 1)
    assert edited != readme
    assert report.fill(edited) == readme  # the generator puts the measured number back ...
    assert report.fill(readme) == readme  # ... so the committed page equals its regeneration only unedited


def test_prose_outside_the_blocks_is_kept(report):
    text = "intro\n<!-- generated: headline bench -->\nstale\n<!-- end generated -->\nafter\n"
    filled = report.fill(text)
    assert filled.startswith("intro\n") and filled.endswith("<!-- end generated -->\nafter\n")
    assert "stale" not in filled and "| harmful0.1 | `spf` |" in filled


def test_an_unknown_block_names_the_known_ones(report):
    with pytest.raises(ValueError, match="unknown generated block 'nope'; known: bench-setup"):
        report.fill("<!-- generated: nope -->\n<!-- end generated -->\n")


def test_summary_headers_come_from_every_run(report):
    """The grid's bench.md once said '500 task test examples' and lr 5e-5 for all runs, from its first run."""
    header = (ROOT / "benchmarks" / "results" / "bench" / "bench.md").read_text().split("| setting |")[0]
    assert "task test examples: agnews 500; facts 20; sst2 500" in header
    assert "40 steps of 8 at lr 0.0002, LoRA r = 8 (harmful0.1-lora8-lr0.0002)" in header
    assert "200 steps of 8 at lr 5e-05, full fine-tuning (harmful0.1-deep5)" in header


def test_the_api_page_documents_every_public_name():
    import safeft

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    missing = [name for name, module in safeft._EXPORTS.items() if f"::: {module}.{name}\n" not in page]
    assert not missing, f"docs/reference/api.md lacks {missing}"
    assert set(safeft.__all__) - {"__version__"} == set(safeft._EXPORTS)


def test_the_headline_states_both_rules_and_the_limits_list_every_loss(report):
    """The README says which rule it reports before the table, and every setting SPF neither wins nor ties under
    that rule is listed under 'What is known not to work' with its numbers."""
    readme = (ROOT / "README.md").read_text()
    headline = readme[readme.index("<!-- generated: headline bench -->"):]
    assert headline.index("Rule B (the one this project reports)") < headline.index("| setting | rule B winner |")
    limits = readme[readme.index("<!-- generated: limits bench -->"):].split("<!-- end generated -->")[0]
    verdicts = report.bench_data("bench")["verdicts"]["B"]
    lost = {v["setting"] for v in verdicts if v["methods"]["spf"]["status"] not in ("wins", "ties")}
    assert lost and lost == {line[2:].split(":")[0] for line in limits.splitlines() if line.startswith("- ")} - {
        "white-box GCG (jailbreaks.json)"}
