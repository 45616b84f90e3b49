"""SPF, the core defence (SPEC §2), and its control with random bases.

``spf`` runs with the library defaults; ``spf-paper`` is the paper's reading (rank 8, left, conflict, grad, one
sample, every refusal token) as a preset of the same method; ``spf-random`` keeps SPF's per-target ranks and
singular values but replaces every basis by a random orthonormal one (seeded). If the control protected as well as
``spf``, the safety subspace would not be what protects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from safeft.config import TrainConfig
from safeft.data import DEFAULT_SAFETY_SAMPLES
from safeft.distributed import is_main_process
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext
from safeft.spf.config import SPFConfig


@dataclass
class SPFOptions(SPFConfig):
    """:class:`~safeft.config.SPFConfig` plus where the safety samples come from.

    Args:
        safety_samples: how many built-in safety samples (harmful request -> varied refusal) to estimate from;
            never a request that is in the fine-tuning data.
        safety_data: a JSONL file of ``{prompt, refusal[, compliance]}`` to estimate from instead (every row whose
            prompt is not in the fine-tuning data).
        margin: give each built-in sample the unaligned base model's own compliant answer, so the subspace spans
            the gradient of the refusal-vs-compliance margin (samples it refuses keep the refusal loss alone; the
            run records how many carry one as ``margin_samples``, and refuses to run if none does).
        subspace: a saved subspace (a directory from ``safeft subspace estimate`` or ``save_pretrained``) to use
            instead of estimating one; it must fit the model (names, shapes; other weights warn). The estimation
            options then take the subspace's recorded values (rank policy, max_rank, target_modules, onset_tokens,
            safety samples, margin); one set to another value is refused, since it could not apply.
        keep_trainable: regular expressions of parameters SPF does not project (under full fine-tuning the blocks'
            norm weights) to leave trainable; by default every one is frozen, since nothing would guard it.
        task_overlap: a task-aware subspace: estimate the fine-tuning data's gradient (``task_examples`` of its
            rows, seeded, as given: harmful rows included) and drop every safety direction whose share in that
            gradient's top-``task_rank`` span on the side in force exceeds this, in (0, 1]; None: keep all.
        task_rank: directions per target of the task's gradient that ``task_overlap`` compares against.
        task_examples: training rows the task's gradient is estimated from.
    """

    safety_samples: int = DEFAULT_SAFETY_SAMPLES
    safety_data: str | None = None
    margin: bool = False
    subspace: str | None = None
    keep_trainable: list[str] | None = None
    task_overlap: float | None = None
    task_rank: int = 16
    task_examples: int = 32

    def __post_init__(self) -> None:
        if self.subspace:  # the saved subspace's settings, before SPFConfig's checks
            use_subspace_settings(self)
        super().__post_init__()
        if self.safety_samples <= 0:
            raise UserError(f"safety_samples must be positive, got {self.safety_samples}")
        if self.task_overlap is not None and not 0.0 < self.task_overlap <= 1.0:
            raise UserError(f"task_overlap is a share of a direction, in (0, 1]; got {self.task_overlap}")
        if self.task_rank <= 0 or self.task_examples <= 0:
            raise UserError(f"task_rank and task_examples must be positive, got {self.task_rank} and "
                             f"{self.task_examples}")

    def check_given(self, given: dict) -> None:
        """Raise ``UserError`` if an option in ``given`` (the flags, YAML keys and preset the options were built
        from) was replaced by the saved subspace's value: one given at its default value is not told apart from
        one left unset by ``__post_init__``, so it is compared here."""
        if not self.subspace:
            return
        from safeft.config import from_dict

        asked = from_dict(type(self), {k: v for k, v in given.items() if k.replace("-", "_") != "subspace"})
        names = {k.replace("-", "_") for k in given}
        dropped = [f"{name}: {getattr(asked, name)} asked, the subspace has {getattr(self, name)}"
                   for name in _SUBSPACE_SETTINGS if name in names and getattr(asked, name) != getattr(self, name)]
        if dropped:
            raise _settings_conflict(self.subspace, dropped)


_SUBSPACE_SETTINGS = ("max_rank", "target_modules", "onset_tokens", "safety_samples", "margin")


def _policy_text(rank, energy, budget) -> str:
    return " and ".join(f"{name} {value}" for name, value in (("rank", rank), ("energy", energy), ("budget", budget))
                        if value is not None) or "the default rank"


def use_subspace_settings(options: SPFOptions) -> None:
    """Give ``options`` the estimation settings recorded in its saved ``subspace`` (so the run records what guards
    it), and raise ``UserError`` naming both values for every one set to something else, which could not apply.

    An option left at its default takes the recorded value; the rank policy counts as set when any of ``rank``,
    ``energy`` or ``budget`` is given. ``safety_data`` must hold the subspace's samples (all of them, or them
    among others).
    """
    from safeft.spf.subspace import SafetySubspace, samples_sha256

    meta = SafetySubspace.read_metadata(options.subspace)
    policy = meta["rank_policy"]
    recorded = {"rank": policy.get("rank"), "energy": policy.get("energy"), "budget": policy.get("budget")}
    asked = {name: getattr(options, name) for name in recorded}
    conflicts = []
    if any(v is not None for v in asked.values()) and asked != recorded:
        conflicts.append(f"rank policy: {_policy_text(**asked)} asked, the subspace has {_policy_text(**recorded)}")
    defaults = {f.name: f.default for f in fields(SPFOptions)}
    samples = meta["samples"]
    values = {"max_rank": policy.get("max_rank", defaults["max_rank"]), "target_modules": policy["target_modules"],
              "onset_tokens": policy.get("onset_tokens"), "margin": any(s.get("compliance") for s in samples)}
    if options.safety_data is None:
        values["safety_samples"] = meta["num_samples"]
    for name, value in values.items():
        given = getattr(options, name)
        if given != defaults[name] and given != value:
            shown = "none" if value is None else value
            conflicts.append(f"{name}: {given} asked, the subspace has {shown}" if name != "margin" else
                             "margin: asked, but the subspace's samples carry no compliance answer")
    if options.safety_data is not None:
        from safeft.data import load_safety_samples

        rows = load_safety_samples(options.safety_data)
        if not _holds_in_order(rows, samples):
            conflicts.append(f"safety_data: {options.safety_data} has {len(rows)} sample(s) (sha256 "
                             f"{samples_sha256(rows)[:12]}), the subspace was estimated from {meta['num_samples']} "
                             f"others (sha256 {meta['samples_sha256'][:12]})")
    if conflicts:
        raise _settings_conflict(options.subspace, conflicts)
    if not any(v is not None for v in asked.values()):
        options.rank, options.energy, options.budget = recorded["rank"], recorded["energy"], recorded["budget"]
    for name, value in values.items():
        setattr(options, name, value)


def _settings_conflict(subspace: str, conflicts: list[str]) -> UserError:
    return UserError(f"--subspace {subspace} was estimated with other settings than this run asks for (given, or by "
                     "the method's preset), and they cannot apply to a saved subspace:\n  " + "\n  ".join(conflicts)
                     + "\nDrop those options (the subspace's values are used and recorded), or estimate a new "
                       "subspace with them (leave out --subspace, or run safeft subspace estimate).")


def _holds_in_order(rows: list, samples: list[dict]) -> bool:
    """Return True if the stored ``samples`` are ``rows`` with some left out (those in the fine-tuning data)."""
    from safeft.spf.files import sample_dict

    wanted, it = [dict(s) for s in samples], iter(sample_dict(r) for r in rows)
    return bool(wanted) and all(any(w == r for r in it) for w in wanted)


@dataclass
class SPFRandomOptions(SPFOptions):
    """SPF's options plus the seed of the random bases.

    Args:
        random_seed: seed of the random bases; None: the run's seed (each seed of a bench draws other bases).
    """

    random_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refresh_every:
            raise UserError("spf-random cannot refresh its bases (a refresh would estimate the real subspace); "
                             "set refresh_every to 0")


# The paper's reading: one sample, rank 8, left side, conflict mode, projecting the gradient, every refusal token.
PAPER_PRESET = {"rank": 8, "side": "left", "mode": "conflict", "project": "grad", "onset_tokens": None,
                "safety_samples": 1}


class SPF(Method):
    """Estimate the safety subspace at the aligned weights, freeze what SPF cannot project, project every step."""

    Config = SPFOptions

    def __init__(self, config=None, name: str | None = None):
        super().__init__(config, name or "spf")
        self.subspace = None
        self.run_facts: dict = {}
        self.callback = None

    def options(self, train: TrainConfig) -> dict:
        """Return the options with the side and the rank in force for ``train`` where they are left to the
        defaults (``right`` and 128, or ``left`` and 64 under LoRA), so a run records the rule that guarded it."""
        lora = train.lora_r > 0
        return {**super().options(train), "side": self.config.side_for(lora), "rank": self.config.rank_for(lora)}

    def safety_samples(self, run: RunContext) -> list:
        """Return the samples to estimate from: the file's, or built-in ones outside the fine-tuning data."""
        from safeft.data import builtin_safety_samples, load_safety_samples

        if self.config.safety_data:
            samples = [s for s in load_safety_samples(self.config.safety_data) if s.prompt not in run.task_prompts]
            if not samples:
                raise UserError(f"every prompt of {self.config.safety_data} is in the fine-tuning data; SPF "
                                 "estimates from safety samples outside it")
            return samples
        samples = builtin_safety_samples(self.config.safety_samples, exclude=run.task_prompts)
        if self.config.margin:
            from safeft.answers import compliant_examples

            answers = {e.prompt: e.response for e in compliant_examples(run.base_model, run.harmful_answers,
                                                                          run.cache)}
            samples = [replace(s, compliance=answers.get(s.prompt)) for s in samples]
            paired = sum(s.compliance is not None for s in samples)
            if not paired:  # the margin would silently be the refusal loss alone
                source = run.harmful_answers or f"the base model {run.base_model}"
                raise UserError(f"margin: {source} gives a compliant answer to none of the {len(samples)} "
                                 "safety samples' requests, so there is no margin to estimate from; name the "
                                 "unaligned model in data.base_model (or give safety_data rows a compliance "
                                 "field), or set margin: false")
        return samples

    def estimate(self, model, tokenizer, run: RunContext):
        """Return the subspace this method guards: the given one (``subspace`` option), else the safety subspace
        of ``model`` estimated at its current weights; with ``task_overlap``, without the directions the task's own
        gradient leans on (:meth:`~safeft.spf.subspace.SafetySubspace.without_task_directions`)."""
        from safeft.spf.subspace import SafetySubspace

        if self.config.subspace:
            subspace = SafetySubspace.load(self.config.subspace, model)
        else:
            subspace = SafetySubspace.estimate(model, tokenizer, self.safety_samples(run), self.config)
        if self.config.task_overlap is not None:  # it applies to a saved subspace as to a fresh one
            subspace = self.task_aware(subspace, model, tokenizer, run)
        return subspace

    def task_aware(self, subspace, model, tokenizer, run: RunContext):
        """Return ``subspace`` without the directions the fine-tuning data's gradient leans on, and keep in
        ``run_facts`` how much of that gradient the subspace removed before and after (the overlap's measure)."""
        import random

        from safeft.spf.estimate import Basis, span_energy, task_gradients

        if not run.examples:
            raise UserError("task_overlap needs the fine-tuning data (run.examples) to estimate the task's gradient")
        rows = random.Random(run.seed).sample(list(run.examples), min(self.config.task_examples, len(run.examples)))
        side = self.config.side_for(lora=any(t.is_lora for t in subspace.check_model(model).values()))
        targets = subspace.check_model(model)
        gradients = task_gradients(model, tokenizer, rows, targets, batch_size=self.config.estimate_batch_size)
        task = {name: Basis(*g.svd(self.config.task_rank)) for name, g in gradients.items() if not g.empty}
        filtered = subspace.without_task_directions(task, side, self.config.task_overlap)
        removed = {}
        for label, guarded in (("before", subspace), ("after", filtered)):
            parts = [span_energy(gradients[name], guarded[name], side) for name in targets]
            removed[label] = sum(p for p, _ in parts) / max(sum(t for _, t in parts), 1e-30)
        self.run_facts.update({"task_gradient_removed_before": removed["before"],
                               "task_gradient_removed_after": removed["after"], **filtered.metadata["task_aware"]})
        return filtered

    def before_training(self, model, tokenizer, run: RunContext) -> None:
        from safeft.spf import freeze_unguarded
        from safeft.spf.subspace import SafetySubspace

        saved = run.out / "subspace"
        if run.resume and saved.exists():  # the interrupted run's subspace, estimated at the same weights
            self.subspace = SafetySubspace.load(saved, model)
        else:
            self.subspace = self.estimate(model, tokenizer, run)  # every process: the same weights, the same subspace
            if is_main_process():
                self.subspace.save(saved, overwrite=True)
        freeze_unguarded(model, self.subspace, self.config.keep_trainable or ())  # nothing would guard them

    def facts(self, model) -> dict:
        """Return the guarded subspace's size: ``subspace_directions`` (ranks summed over targets) and
        ``subspace_fraction`` (its stored numbers, U, S and V, as a share of the model's parameters), and
        ``margin_samples``: how many of its safety samples carry a compliant answer (the margin's); with a refresh,
        ``refreshes`` (the steps), ``refresh_seconds`` and ``refresh_overlaps`` (per refresh, how much of the guarded
        span the fresh estimate keeps: :meth:`~safeft.spf.subspace.SafetySubspace.overlap`)."""
        if self.subspace is None:
            return {}
        facts = {"subspace_directions": sum(b.rank for b in self.subspace.bases.values()),
                 "subspace_fraction": self.subspace.numel() / sum(p.numel() for p in model.parameters()),
                 "margin_samples": sum(bool(s.get("compliance")) for s in self.subspace.metadata["samples"]),
                 **self.run_facts}
        projector = getattr(self.callback, "projector", None)
        if projector is not None and (self.config.refresh_every or self.config.refresh_on_rise is not None):
            stats = projector.stats()
            facts.update({"refreshes": list(stats.refreshes), "refresh_seconds": stats.refresh_seconds,
                          "refresh_overlaps": list(stats.refresh_overlaps)})
        return facts

    def callbacks(self, model, tokenizer, run: RunContext) -> list:
        from safeft.spf import SPFCallback

        self.callback = SPFCallback(self.subspace, self.config, tokenizer,  # it resolves a default side
                                    keep_trainable=self.config.keep_trainable or ())
        return [self.callback]


class SPFRandom(SPF):
    """The control: SPF with the real subspace's per-target ranks but random orthonormal bases."""

    Config = SPFRandomOptions

    def estimate(self, model, tokenizer, run: RunContext):
        seed = run.seed if self.config.random_seed is None else self.config.random_seed
        return super().estimate(model, tokenizer, run).with_random_bases(seed)
