"""The saved subspace as an artifact: its manifest checked on load, its Hub card, loading and pushing offline, and
the `safeft subspace show / card / push` commands."""

import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from safeft.cli import app
from safeft.errors import UserError
from safeft.spf import SPFConfig
from safeft.spf.subspace import SafetySubspace
from safeft.testing import SAFETY_PAIRS, byte_tokenizer, tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A rank-4 subspace of the tiny model from two samples, saved once; tests work on copies."""
    path = tmp_path_factory.mktemp("saved") / "s"
    subspace = SafetySubspace.estimate(tiny_llama(seed=0), byte_tokenizer(), SAFETY_PAIRS[:2], SPFConfig(rank=4),
                                       show_progress=False)
    subspace.save(path)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "s"
    shutil.copytree(saved, target)
    return target


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2))


def drop_target(meta, name="model.layers.1.mlp.down_proj"):
    del meta["model"]["targets"][name], meta["ranks"][name]


def drop_target_and_tensors(path):
    """A target removed from both the metadata and the tensors, consistently: only the manifest can tell."""
    edit_json(path / "subspace.json", drop_target)
    tensors = load_file(str(path / "subspace.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.down_proj.")},
              str(path / "subspace.safetensors"), metadata={"format": "safeft.subspace/1"})


def flip_a_direction(path):
    """U and V with one column's sign flipped: still an orthonormal basis, another file."""
    tensors = load_file(str(path / "subspace.safetensors"))
    for key in ("model.layers.0.mlp.up_proj.U", "model.layers.0.mlp.up_proj.V"):
        tensors[key] = tensors[key].clone()
        tensors[key][:, 0] *= -1
    save_file(tensors, str(path / "subspace.safetensors"), metadata={"format": "safeft.subspace/1"})


def set_modules(meta, patterns):
    meta["rank_policy"]["target_modules"] = patterns
    meta["spf_config"]["target_modules"] = patterns


EDITS = {
    "target removed": (lambda p: edit_json(p / "subspace.json", drop_target), "not in the metadata"),
    "target removed with its tensors": (drop_target_and_tensors, "not the 14 saved in manifest.json"),
    "num_samples edited": (lambda p: edit_json(p / "subspace.json", lambda m: m.update(num_samples=999)),
                           "num_samples is 999 but 2 sample"),
    "targets emptied": (lambda p: edit_json(p / "subspace.json", lambda m: (m["model"]["targets"].clear(),
                                                                             m["ranks"].clear())),
                        "target list is empty"),
    "target_modules edited": (lambda p: edit_json(p / "subspace.json", lambda m: set_modules(m, ["q_proj"])),
                              r"12 target\(s\) are not matched by rank_policy.target_modules \['q_proj'\]"),
    "model key missing": (lambda p: edit_json(p / "subspace.json", lambda m: m.pop("model")),
                          "missing key.s. model"),
    "rank edited": (lambda p: edit_json(p / "subspace.json",
                                        lambda m: m["ranks"].update({"model.layers.0.mlp.up_proj": 3})),
                    "do not match its metadata"),
    "metadata edited elsewhere": (lambda p: edit_json(p / "subspace.json",
                                                      lambda m: m["model"].update(name_or_path="other/model")),
                                  "subspace.json differs from what was saved"),
    "tensor file changed": (flip_a_direction, "subspace.safetensors differs from what was saved"),
    "manifest removed": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest damaged": (lambda p: (p / "manifest.json").write_text("{"), "manifest.json: cannot read"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_or_damaged_subspace_is_refused_naming_the_file(copy, edit):
    change, message = EDITS[edit]
    change(copy)
    with pytest.raises(UserError, match=message) as error:
        SafetySubspace.load(copy)
    assert str(copy) in str(error.value) and "re-estimate" in str(error.value)


def test_the_manifest_records_targets_shapes_counts_and_hashes(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["num_targets"] == 14 and manifest["num_samples"] == 2
    assert manifest["targets"]["model.layers.0.mlp.gate_proj"] == {"shape": [64, 32], "rank": 4}
    for name in ("subspace.safetensors", "subspace.json"):
        assert manifest["files"][name]["sha256"] == hashlib.sha256((saved / name).read_bytes()).hexdigest()
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "subspace.json", "subspace.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a subspace with its manifest loads silently
        assert len(SafetySubspace.load(saved)) == 14
    assert SafetySubspace.read_metadata(saved)["num_samples"] == 2


def make_legacy(path):
    """The directory as safeft wrote it before manifests: no manifest.json, no "integrity" key."""
    (path / "manifest.json").unlink()
    edit_json(path / "subspace.json", lambda m: m.pop("integrity"))


def test_a_subspace_saved_before_manifests_loads_with_a_warning_and_is_still_checked(copy, tmp_path):
    make_legacy(copy)
    with pytest.warns(UserWarning, match="no manifest.json.*consistency only.*Save it again"):
        loaded = SafetySubspace.load(copy)
    assert len(loaded) == 14
    loaded.save(tmp_path / "resaved")  # saving it again adds the manifest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SafetySubspace.load(tmp_path / "resaved")
    for edit in ("target removed", "num_samples edited", "targets emptied", "target_modules edited",
                 "model key missing"):
        damaged = tmp_path / edit.replace(" ", "_")
        shutil.copytree(copy, damaged)
        EDITS[edit][0](damaged)
        with pytest.warns(UserWarning), pytest.raises(UserError, match=EDITS[edit][1]):
            SafetySubspace.load(damaged)


def test_show_never_prints_an_edited_value(copy):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = runner.invoke(app, ["subspace", "show", str(copy)])
    assert result.exit_code == 0 and '"num_samples": 2' in result.output
    edit_json(copy / "subspace.json", lambda m: m.update(num_samples=999))
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = runner.invoke(app, ["subspace", "show", str(copy)])
    assert result.exit_code == 2, result.output
    assert "999" in result.output and "re-estimate" in result.output and '"num_samples": 999' not in result.output
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


# --- the Hub card, loading and pushing ---------------------------------------------------------------------------


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_is_a_standard_model_card_without_local_paths_or_samples(copy, tmp_path):
    subspace = SafetySubspace.load(copy)
    subspace.metadata["model"]["name_or_path"] = str(tmp_path / "my-aligned-model")  # a local path: never shown
    text = str(subspace.generate_model_card())
    meta = front_matter(text)
    assert meta["library_name"] == "safeft" and meta["license"] == "other" and "safety-subspace" in meta["tags"]
    assert "base_model" not in meta
    assert str(tmp_path) not in text and "THIS_REPO_OR_DIR" not in text
    assert SAFETY_PAIRS[0][0] not in text and subspace.metadata["samples_sha256"] in text
    text = str(subspace.generate_model_card(repo_id="me/sub", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                            license_id="apache-2.0", include_samples=True))
    meta = front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert SAFETY_PAIRS[0][0] in text and 'SafetySubspace.from_pretrained("me/sub"' in text
    subspace.metadata["model"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hub id: it is the base
    assert front_matter(str(subspace.generate_model_card()))["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_missing_local_directory_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    import huggingface_hub as hub

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the Hub for a local path")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in (tmp_path / "nope", str(tmp_path / "nope"), "./nope", "runs/subspace", "nope", "a/b/c"):
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such directory"):
            SafetySubspace.from_pretrained(name)
        assert time.perf_counter() - start < 1


def test_a_repo_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot fetch subspace 'me/subspace' from the Hub .offline mode is on"):
        SafetySubspace.from_pretrained("me/subspace")


def test_push_offline_or_unreachable_is_a_clear_error(saved, monkeypatch):
    subspace = SafetySubspace.load(saved)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot push to 'me/sub': offline mode is on"):
        subspace.push_to_hub("me/sub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    class Unreachable:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", Unreachable)
    with pytest.raises(UserError, match="cannot push to 'me/sub' .ConnectionError: .Errno -2.*check the network"):
        subspace.push_to_hub("me/sub")


def test_push_uploads_the_files_and_a_card_naming_the_repo(saved, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the fake Hub is reachable
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    result = runner.invoke(app, ["subspace", "push", str(saved), "me/sub"])
    assert result.exit_code == 0, result.output
    assert sorted(uploaded) == ["README.md", "manifest.json", "subspace.json", "subspace.safetensors"]
    assert b'from_pretrained("me/sub"' in uploaded["README.md"]
    uploaded.clear()
    SafetySubspace.load(saved).save_pretrained(saved.parent / "hub", push_to_hub=True, repo_id="me/other",
                                               model_card_kwargs={"license_id": "mit"})
    assert b"license: mit" in uploaded["README.md"] and b'from_pretrained("me/other"' in uploaded["README.md"]


def test_cli_card_and_push(copy, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = runner.invoke(app, ["subspace", "card", str(copy), "--base-model", "org/model", "--license", "mit"])
    assert result.exit_code == 0, result.output
    meta = front_matter((copy / "README.md").read_text())
    assert meta["base_model"] == "org/model" and meta["license"] == "mit"
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.name != "README.md"} == before
    again = runner.invoke(app, ["subspace", "card", str(copy)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    result = runner.invoke(app, ["subspace", "card", str(copy), "--out", str(tmp_path / "card.md"),
                                 "--include-samples"])
    assert result.exit_code == 0 and SAFETY_PAIRS[0][0] in (tmp_path / "card.md").read_text()
    assert SafetySubspace.load(copy)  # a card beside the files leaves the subspace loadable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = runner.invoke(app, ["subspace", "push", str(copy), "me/sub"])
    assert result.exit_code == 2 and "offline mode is on" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_save_pretrained_writes_the_files_and_the_card(saved, tmp_path):
    SafetySubspace.load(saved).save_pretrained(tmp_path / "hub")
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "manifest.json", "subspace.json",
                                                                   "subspace.safetensors"]
    loaded = SafetySubspace.from_pretrained(tmp_path / "hub")
    assert all(torch.equal(loaded[n].U, b.U) for n, b in SafetySubspace.load(saved).bases.items())


# --- finetune --subspace: estimation options cannot apply to a saved subspace --------------------------------------


@pytest.fixture(scope="module")
def onset2(tmp_path_factory):
    """A subspace estimated with rank 4 on the first 2 tokens of 2 samples (the rest of its settings the defaults)."""
    path = tmp_path_factory.mktemp("onset2") / "s"
    SafetySubspace.estimate(tiny_llama(seed=0), byte_tokenizer(), SAFETY_PAIRS[:2], SPFConfig(rank=4, onset_tokens=2),
                            show_progress=False).save(path)
    return path


def snapshot_files(*roots):
    return {p: p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_finetune_subspace_with_another_rank_exits_2_naming_both(tiny_dir, onset2, tmp_path):
    before = snapshot_files(tiny_dir, onset2)
    result = runner.invoke(app, ["finetune", "--model", str(tiny_dir), "--out", str(tmp_path / "run"), "--method",
                                 "spf", "--subspace", str(onset2), "--rank", "2", "--steps", "1"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "rank 2 asked, the subspace has rank 4" in result.output and str(onset2) in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    assert snapshot_files(tiny_dir, onset2) == before


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 2}, "rank 2 asked, the subspace has rank 4"),
    ({"energy": 0.9}, "energy 0.9 asked, the subspace has rank 4"),
    ({"budget": 8}, "budget 8 asked, the subspace has rank 4"),
    ({"onset_tokens": 3}, "onset_tokens: 3 asked, the subspace has 2"),
    ({"target_modules": ["q_proj"]}, r"target_modules: \['q_proj'\] asked, the subspace has none"),
    ({"max_rank": 8}, "max_rank: 8 asked, the subspace has 64"),
    ({"safety_samples": 5}, "safety_samples: 5 asked, the subspace has 2"),
    ({"margin": True}, "margin: asked, but the subspace's samples carry no compliance"),
])
def test_every_estimation_option_that_differs_from_the_subspace_is_refused(onset2, options, message):
    from safeft.methods import build_method

    for name in ("spf", "spf-random"):
        with pytest.raises(UserError, match=message) as error:
            build_method(name, {"subspace": str(onset2), **options})
        assert str(onset2) in str(error.value) and "Drop those options" in str(error.value)


def test_an_option_given_at_its_default_value_is_not_dropped_either(tiny_dir, onset2, tmp_path):
    from safeft.methods import build_method

    with pytest.raises(UserError, match="onset_tokens: 4 asked, the subspace has 2"):
        build_method("spf", {"subspace": str(onset2), "onset_tokens": "4"})  # 4 is the default: given, it counts
    with pytest.raises(UserError, match="safety_samples: 20 asked, the subspace has 2"):
        build_method("spf", {"subspace": str(onset2), "safety_samples": 20})
    assert build_method("spf", {"subspace": str(onset2), "onset_tokens": 2}).config.onset_tokens == 2
    config = tmp_path / "run.yaml"
    config.write_text(f"subspace: {onset2}\nonset_tokens: 4\n")
    result = runner.invoke(app, ["finetune", "--model", str(tiny_dir), "--out", str(tmp_path / "run"), "--method",
                                 "spf", "--config", str(config)])
    assert result.exit_code == 2 and "onset_tokens: 4 asked, the subspace has 2" in result.output


def test_safety_data_must_hold_the_subspace_samples(onset2, tmp_path):
    from safeft.methods import build_method

    same, other = tmp_path / "same.jsonl", tmp_path / "other.jsonl"
    rows = [{"prompt": p, "refusal": r} for p, r in SAFETY_PAIRS]
    same.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))  # the subspace's two among others: fine
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    assert build_method("spf", {"subspace": str(onset2), "safety_data": str(same)}).config.safety_data == str(same)
    with pytest.raises(UserError, match=r"safety_data: .*other.jsonl has \d+ sample\(s\) .*estimated from 2 others"):
        build_method("spf", {"subspace": str(onset2), "safety_data": str(other)})


def test_options_left_unset_take_the_subspace_values_and_are_recorded(onset2):
    from safeft.config import TrainConfig
    from safeft.methods import build_method

    for options in ({}, {"rank": 4, "onset_tokens": 2, "safety_samples": 2}, {"side": "left", "mode": "conflict"}):
        recorded = build_method("spf", {"subspace": str(onset2), **options}).options(TrainConfig())
        assert (recorded["rank"], recorded["energy"], recorded["budget"]) == (4, None, None)
        assert (recorded["onset_tokens"], recorded["safety_samples"], recorded["target_modules"]) == (2, 2, None)
    assert recorded["side"] == "left" and recorded["mode"] == "conflict"  # projection options apply as given


def test_a_finetune_with_a_subspace_records_what_ran(tiny_dir, onset2, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--model", str(tiny_dir), "--out", str(run), "--method", "spf",
                                 "--subspace", str(onset2), "--steps", "1", "--batch-size", "2", "--task",
                                 "sentiment", "--max-train", "4", "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    options = json.loads((run / "config.json").read_text())["method_options"]
    assert (options["rank"], options["onset_tokens"], options["safety_samples"]) == (4, 2, 2)
    assert SafetySubspace.load(run / "subspace").metadata["samples_sha256"] == \
        SafetySubspace.read_metadata(onset2)["samples_sha256"]
