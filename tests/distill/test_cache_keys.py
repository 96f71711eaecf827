"""Every key the distillation keeps results under is derived from a typed view of the config, never from a list of
names: the LM stage's (tests/distill/test_lm_stage.py), the LM-only generator's final candidates (the run's
:class:`~dilm.sampling.SamplingSpec`, counts and seed), its step-0 validation (:class:`ValidationSpec`, the sampling
and the seed), and the run checkpoint's resume check (every field but those declared ``resume_free``).

Each test walks every :class:`DistillConfig` field: a field changes the key exactly when it changes the view, and
every field of the view enters the key."""

import dataclasses

import pytest

from dilm import DilmError
from dilm.distill import DistillConfig, Distiller, State, save_checkpoint, train_lm
from dilm.distill.candidates import GENERATOR_DRAW, LM_DRAW, final_counts, final_seed, lm_candidates_place
from dilm.distill.checkpoint import RESUME_FREE, load_checkpoint
from dilm.distill.match_stage import ValidationSpec, step0_cache_path
from dilm.distill.select import Selection
from dilm.sampling import SamplingSpec
from dilm.tasks import Example, TaskData
from tests.distill.test_lm_stage import OTHER_VALUE, other_value

DRAWS = (LM_DRAW, GENERATOR_DRAW)
# the base walks a packaged learner and probe (the step-0 validation is kept only for those): other values differ
FIELD_VALUE = {**OTHER_VALUE, "task": "ag_news", "prompt_template": "Review ({label}):"}  # beside the LM test's
OTHER = {**FIELD_VALUE, "learner": "tiny-bert", "probe": "tiny-bert"}
# what the walk from an LM checkpoint cannot change: the data (passed loaded; its hash is checked apart), the
# checkpoint itself, its generator and prompt (checked on load; the SamplingSpec's fields are walked apart)
NOT_WALKED = {"task", "lm_checkpoint", "generator", "prompt_template"}


def _changed(cfg: DistillConfig, name: str, table: dict = OTHER) -> DistillConfig:
    other = dataclasses.replace(cfg, **{name: table[name] if name in table else other_value(cfg, name)})
    assert getattr(other, name) != getattr(cfg, name), name
    return other


def _other(value):
    """A different value of a view's field."""
    if isinstance(value, Selection):
        return dataclasses.replace(value, method="kmeans" if value.method != "kmeans" else "herding")
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return {"dynamic": "static", "auto": "fp32", "fp32": "bf16", "bf16": "fp32"}.get(value, value + "x")
    return value * 2 + 1


@pytest.fixture(scope="module")
def walk(tmp_path_factory, toy_task):
    """From one LM checkpoint: the base run, then one run per walked field changed; for each, its views and keys."""
    tmp = tmp_path_factory.mktemp("keys")
    base = DistillConfig.from_preset("smoke", learner="minilm-l6", probe="minilm-l6", label_filter="probe",
                                     output_dir=str(tmp / "run"))
    lm = str(train_lm(base, tmp / "lm", task=toy_task))
    base = dataclasses.replace(base, lm_checkpoint=lm)

    def seen(cfg: DistillConfig) -> dict:
        ctx = Distiller(cfg, task=toy_task)
        counts, names = final_counts(ctx)
        val = ValidationSpec.of(cfg)
        sampling = dataclasses.asdict(ctx.sampling)
        draws = {f"candidates/{d}": (sampling, counts, names, final_seed(cfg, d)) for d in DRAWS}
        keys = {f"candidates/{d}_key": lm_candidates_place(ctx, counts, names, d)[0] for d in DRAWS}
        return {"ctx": ctx, **draws, **keys, "validation": (val, sampling, cfg.seed),
                "validation_key": step0_cache_path(ctx, val)}

    fields = [f.name for f in dataclasses.fields(DistillConfig) if f.name not in NOT_WALKED]
    return seen(base), {name: seen(_changed(base, name)) for name in fields}


def _split(walk, *views: str) -> tuple[set, set]:
    """(fields that changed a key, fields that changed none), after checking that each field changed each view's key
    (``<view>_key``) exactly when it changed the view."""
    base, runs = walk
    changed, kept = set(), set()
    for name, run in runs.items():
        for view in views:
            moved = run[f"{view}_key"] != base[f"{view}_key"]
            assert moved == (run[view] != base[view]), f"{name}: {view}'s key {'moved' if moved else 'stayed'}"
            (changed if moved else kept).add(name)
    return changed, kept - changed


def test_every_sampling_field_and_no_other_field_enters_the_candidates_key(walk, toy_task):
    """The LM-only generator's final candidates are kept under the run's SamplingSpec, the counts, the names and
    the draw's seed (and the weights and the data): a config field changes the key exactly when it changes those,
    and every SamplingSpec field enters it."""
    changed, kept = _split(walk, *(f"candidates/{d}" for d in DRAWS))
    assert {"top_p", "gen_batch_size", "sampler", "drop_unfinished", "max_new_tokens", "seed", "over_sample", "dpc",
            "n_sets", "final_pool", "final_sources"} <= changed
    assert {"generator_lr", "outer_loops", "selection", "val_steps", "lm_lr", "temperature", "final_mix"} <= kept
    base = walk[0]
    ctx, counts, names = base["ctx"], *final_counts(base["ctx"])
    for f in dataclasses.fields(SamplingSpec):
        ctx.__dict__["sampling"] = dataclasses.replace(base["ctx"].sampling, **{
            f.name: _other(getattr(base["ctx"].sampling, f.name))})
        assert lm_candidates_place(ctx, counts, names)[0] != base[f"candidates/{LM_DRAW}_key"], f.name
        del ctx.__dict__["sampling"]
    other = list(toy_task.train)
    other[3] = Example(other[3].text + " !", other[3].label)
    edited = Distiller(ctx.cfg, task=TaskData("toy", toy_task.label_names, other, toy_task.test))
    assert lm_candidates_place(edited, counts, names)[0] != base[f"candidates/{LM_DRAW}_key"]  # the data's hash


def test_candidates_kept_in_the_run_follow_the_sampling_and_the_lm_stages_key(walk, toy_task):
    """Without an LM checkpoint (the LM stage ran in the run) the key holds the LM stage's key in place of the
    weights' files: an LM-stage field changes it, a matching field does not."""
    base = dataclasses.replace(walk[0]["ctx"].cfg, lm_checkpoint="")

    def key(cfg: DistillConfig, **sampling) -> str:
        ctx = Distiller(cfg, task=toy_task)
        if sampling:
            ctx.__dict__["sampling"] = dataclasses.replace(ctx.sampling, **sampling)
        return lm_candidates_place(ctx, *final_counts(ctx))[0].name

    ours = key(base)
    assert ours.startswith("lm_candidates-") and key(dataclasses.replace(base, generator_lr=1e-3)) == ours
    assert key(dataclasses.replace(base, lm_lr=5e-4)) != ours and key(base, top_p=0.5) != ours


def test_every_validation_field_and_no_other_field_enters_the_step0_key(walk):
    """The step-0 validation is kept under the ValidationSpec, the run's sampling and seed (and the weights and the
    data): a config field changes the key exactly when it changes those, and every ValidationSpec field enters it.
    A learner or probe that is not packaged gives no key at all (the result is computed, never kept)."""
    changed, kept = _split(walk, "validation")
    assert {"val_steps", "val_dpc", "val_sets", "val_seeds", "val_size", "over_sample", "selection", "select_pooling",
            "copy_filter", "filter_threshold", "label_filter", "probe", "probe_examples", "learner", "top_p",
            "seed"} <= changed
    assert {"final_mix", "n_sets", "dpc", "generator_lr", "outer_loops", "pooling", "lm_lr", "temperature",
            "checkpoint_interval", "val_interval"} <= kept
    base = walk[0]
    val = ValidationSpec.of(base["ctx"].cfg)
    for f in dataclasses.fields(ValidationSpec):
        if f.name in ("learner", "probe"):
            continue  # another model: no key (above)
        other = dataclasses.replace(val, **{f.name: _other(getattr(val, f.name))})
        assert step0_cache_path(base["ctx"], other) != base["validation_key"], f.name


def test_a_resumed_run_may_change_only_the_fields_declared_resume_free(tmp_path):
    """The run checkpoint refuses a config that differs in any field but those declared ``resume_free`` (where the
    run goes on, how many final sets it writes); a test hook is no config field."""
    import torch

    cfg = DistillConfig.from_preset("smoke", output_dir=str(tmp_path))
    generator = torch.nn.Linear(2, 2)
    save_checkpoint(cfg, generator, State(stage="match", step=12, outer=1), None)
    assert load_checkpoint(cfg, generator, "cpu")[0].step == 12
    assert set(RESUME_FREE) == {"n_sets", "device"} and "fail_at_step" not in cfg.to_dict()
    for f in dataclasses.fields(DistillConfig):
        if f.name == "output_dir":
            continue  # where the checkpoint is looked for
        other = _changed(cfg, f.name, FIELD_VALUE)
        if f.name in RESUME_FREE:
            assert load_checkpoint(other, generator, "cpu")[0].step == 12
        else:
            with pytest.raises(DilmError, match=rf"different configuration \(\['{f.name}'\]\)"):
                load_checkpoint(other, generator, "cpu")
