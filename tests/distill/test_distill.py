"""End-to-end DiLM on tiny models: config validation, presets, selection, resume, the CLI smoke preset."""

import dataclasses
import json
import math
import re

import pytest
import torch
import yaml

from dilm import DilmError
from dilm.cli import main
from dilm.distill import PRESETS, DistillConfig, Distiller, LMStageConfig, State, distill, match_stage
from dilm.distill.config import PRESET_DIR, load_preset
from dilm.distill.lm_stage import lm_optimizer
from dilm.protocol import linear_warmup_decay
from dilm.selection import kmeans_nearest
from dilm.synset import read_set
from dilm.tasks import Example, load_task
from dilm.text import pad_ids


@pytest.mark.parametrize("overrides,match", [
    ({"outer_loops": 3, "generate_interval": 2}, "multiple of generate_interval"),
    ({"task": "sst3"}, "unknown task 'sst3'"),
    ({"syn_per_class": 9, "pool_per_class": 8}, "exceeds pool_per_class"),
    ({"dpc": (0,)}, "dpc must be positive"),
    ({"bogus": 1}, r"unknown distill option\(s\) \['bogus'\]"),
    ({"sampler": "fast"}, "unknown sampler 'fast'; known: dynamic, static, compiled"),
    ({"gen_loss_norm": "token"}, "unknown gen_loss_norm 'token'; known: batch, text"),
    ({"length_quantile": 0}, r"length_quantile must be in \(0, 1\], got 0"),
    ({"length_cap": 0}, "length_cap must be >= 1, got 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0, got -1"),
    ({"selection": "greedy"}, "unknown selection 'greedy'; known: kmeans, herding, herding-real"),
    ({"copy_filter": "fuzzy"}, "unknown copy_filter 'fuzzy'; known: none, exact, near"),
    ({"final_pool": "pooled"}, "unknown final_pool 'pooled'; known: per_set, shared"),
    ({"final_sources": "lm"}, "unknown final_sources 'lm'; known: generator, generator\\+lm"),
    ({"final_mix": "half"}, "unknown final_mix 'half'; known: pooled, split"),
    ({"label_filter": "probe", "probe": ""}, "label_filter probe needs a probe"),
    ({"filter_threshold": 1.0}, r"filter_threshold must be in \[0, 1\)"),
])
def test_bad_configs_fail_before_any_model_loads(overrides, match):
    with pytest.raises(DilmError, match=match):
        DistillConfig.from_preset("smoke", **overrides)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_a_valid_config(preset):
    cfg = DistillConfig.from_preset(preset)  # validates (divisibility, sizes, sampler mode)
    assert DistillConfig(**cfg.to_dict()) == cfg  # what provenance and the sweep's params record rebuilds it


def test_every_preset_file_holds_config_fields_each_with_its_reason():
    """``dilm/presets/*.yaml`` is ``PRESETS``: each file loads, sets only DistillConfig fields, builds a valid config
    that keeps every value as written, and gives every value a reason (a comment on its line)."""
    files = sorted(PRESET_DIR.glob("*.yaml"))
    assert [p.stem for p in files] == sorted(PRESETS) and {"smoke", "demo", "gpu", "paper"} <= set(PRESETS)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    for path in files:
        raw = yaml.safe_load(path.read_text())
        assert raw and set(raw) <= fields, path.name
        values = load_preset(path)
        assert values == PRESETS[path.stem] and set(values) == set(raw)
        cfg = DistillConfig(**values)
        assert {k: getattr(cfg, k) for k in values} == values, path.name
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.fullmatch(r"\w+: \S.*?\s+# \S.*", line), f"{path.name}: no reason on {line!r}"


@pytest.mark.parametrize("text,match", [
    ("lm_stepz: 3  # a typo\n", "unknown key 'lm_stepz'"),
    ("lm_lr: 1e-4\n", r"lm_lr must be a float, got '1e-4' \(YAML reads"),
    ("dpc: 2\n", "dpc must be a tuple, got 2"),
    ("- smoke\n", "expected a mapping"),
])
def test_a_bad_preset_file_fails_naming_the_file_and_the_key(tmp_path, text, match):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(DilmError, match=f"preset {re.escape(str(path))}: {match}"):
        load_preset(path)


def test_dpc_larger_than_class_and_missing_model_fail_early(tmp_path, toy_task):
    with pytest.raises(DilmError, match="model path '/nope' does not exist"):
        Distiller(DistillConfig.from_preset("smoke", generator="/nope", output_dir=str(tmp_path)), task=toy_task)
    with pytest.raises(DilmError, match="DPC 500 is larger than class"):
        Distiller(DistillConfig.from_preset("smoke", dpc=(500,), output_dir=str(tmp_path)), task=toy_task)


@pytest.mark.integration
def test_final_sets_exact_dpc_no_duplicates(smoke_run):  # conftest's: a whole smoke run on the toy task, two DPCs
    cfg, result = smoke_run.cfg, smoke_run.result
    assert sorted(result.sets) == [2, 3]
    for dpc, paths in result.sets.items():
        assert len(paths) == cfg.n_sets
        for p in paths:
            s = read_set(p, ("negative", "positive"))
            assert s.counts() == [dpc, dpc]
            assert len({e.text for e in s.examples}) == len(s.examples)
    prov = json.loads(result.provenance.read_text())
    assert prov["config"]["dpc"] == [2, 3] and "torch" in prov["versions"] and prov["timings_s"]
    # every DPC's copies of training and test texts, in provenance, the result and the metrics
    assert set(prov["copies"]) == {"2", "3"} and prov["copies"]["3"]["train"]["n"] == 3 * 2 * cfg.n_sets
    assert result.copies[2]["train"]["near"] >= result.copies[2]["train"]["exact"] >= 0
    assert {f"copies/{s}_{k}/dpc{d}" for s in ("train", "test") for k in ("exact", "near") for d in (2, 3)} <= {
        k for m in smoke_run.seen for k in m}


@pytest.mark.integration
def test_callback_sees_lm_match_and_validation_metrics(smoke_run):
    cfg, result, seen = smoke_run.cfg, smoke_run.result, smoke_run.seen
    stages = {m["stage"] for m in seen}
    assert stages == {"lm", "match", "select"}  # select: the final sets' label agreement
    match_steps = [m for m in seen if "match_loss" in m]
    assert len(match_steps) == cfg.total_match_steps
    assert [m["step"] for m in match_steps] == list(range(cfg.lm_steps + 1, cfg.lm_steps + cfg.total_match_steps + 1))
    assert any("val_accuracy" in m for m in seen) and result.best_val_accuracy is not None
    assert result.timings["val_s"] > 0  # the cost of validation is measured and written to provenance


@pytest.mark.integration
def test_resume_from_checkpoint_continues_the_step_count(tmp_path, toy_task, monkeypatch):
    cfg = DistillConfig.from_preset("smoke", output_dir=str(tmp_path), outer_loops=3)
    monkeypatch.setattr(match_stage, "FAIL_AT_STEP", 3)  # the test hook: not a config field
    with pytest.raises(RuntimeError, match="injected failure"):
        distill(cfg, task=toy_task)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "match" and state["outer"] == 1
    seen, again = [], []
    monkeypatch.setattr(match_stage, "FAIL_AT_STEP", 5)
    with pytest.raises(RuntimeError, match="injected failure"):  # resumed, then stopped again in outer loop 3
        distill(cfg, callback=seen.append, task=toy_task)
    # the AdamW moments came back too: the optimiser counts every matching step, not just the resumed ones
    opt = torch.load(tmp_path / "checkpoint" / "weights.pt")["optimizer"]
    assert {int(s["step"]) for s in opt["state"].values()} == {4}
    monkeypatch.setattr(match_stage, "FAIL_AT_STEP", None)
    distill(cfg, callback=again.append, task=toy_task)
    for rows, loops in ((seen, (3, 4, 5)), (again, (5, 6))):  # from the last checkpoint; LM stage not repeated
        assert [m["step"] for m in rows if "match_loss" in m] == [cfg.lm_steps + k for k in loops]
        assert not any(m["stage"] == "lm" for m in rows)
    # after the last outer loop the checkpoint holds the generator the final sets came from, and nothing else
    last = torch.load(tmp_path / "checkpoint" / "weights.pt")
    assert last["best"] is None and last["optimizer"] is None


@pytest.mark.parametrize("damage,file", [
    (lambda d: (d / "weights.pt").write_bytes((d / "weights.pt").read_bytes()[:100]), "weights.pt"),  # truncated
    (lambda d: (d / "weights.pt").unlink(), "weights.pt"),
    (lambda d: (d / "state.json").write_text('{"stage": "match", "st'), "state.json"),  # cut short mid-write
    (lambda d: (d / "state.json").write_text("[]"), "state.json"),
    (lambda d: torch.save({"generator": {"weight": torch.zeros(3, 3)}}, d / "weights.pt"), "weights.pt"),
])
def test_a_damaged_distill_checkpoint_is_one_line_naming_its_file(tmp_path, damage, file):
    from dilm.distill import load_checkpoint, save_checkpoint

    cfg = DistillConfig.from_preset("smoke", output_dir=str(tmp_path))
    generator = torch.nn.Linear(2, 2)
    save_checkpoint(cfg, generator, State(stage="match", step=4, outer=1), None)
    assert load_checkpoint(cfg, generator, "cpu")[0].outer == 1  # whole, it resumes
    damage(tmp_path / "checkpoint")
    with pytest.raises(DilmError) as err:
        load_checkpoint(cfg, generator, "cpu")
    message, folder = str(err.value), tmp_path / "checkpoint"
    assert message.startswith(f"distill checkpoint {folder / file} is damaged (") and "\n" not in message
    assert message.endswith(f"delete {tmp_path / 'checkpoint'} to start this run again from the beginning")


def test_cli_unknown_task_is_one_line(tmp_path, capsys):
    """(The CLI's whole smoke runs on packaged tasks: test_cli_smoke_preset_on_pair_and_multiclass_tasks.)"""
    assert main(["distill", "--task", "nope", "--preset", "smoke", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dilm: error: unknown task 'nope'") and "\n" not in err


def test_token_limits_come_from_the_tasks_data(tmp_path):
    """by default max_length / max_new_tokens are the 0.99 quantile of the task's token lengths (a fixed
    64 cut 47.5 % of MRPC's rendered pairs), capped by length_cap; explicit values win."""
    task = load_task("mrpc")
    run = Distiller(DistillConfig.from_preset("smoke", task="mrpc", length_cap=512, output_dir=str(tmp_path)),
                    task=task)
    limits = run.limits
    full = [len(s) for s in run.full_corpus.sequences]
    assert sum(n > limits["max_length"] for n in full) <= 0.01 * len(full) < sum(n > 64 for n in full) / 40
    assert all(len(s) <= limits["max_length"] for s in run.corpus.sequences)
    assert limits["max_new_tokens"] > 64 and run.sampler.spec.max_new_tokens == limits["max_new_tokens"]
    capped = Distiller(DistillConfig.from_preset("smoke", task="mrpc", length_cap=30, max_new_tokens=7,
                                                 output_dir=str(tmp_path)), task=task).limits
    assert capped == {"max_length": 30, "max_new_tokens": 7}


@pytest.mark.integration
@pytest.mark.parametrize("task", ["mrpc", pytest.param("ag_news", marks=pytest.mark.slow)])
def test_cli_smoke_preset_on_pair_and_multiclass_tasks(task, tmp_path, capsys):
    """``--preset smoke`` on MRPC used to stop with "0 usable texts": pairs now always parse (see
    test_sampling), and the sets hold whole pairs. One outer loop of the preset's two: every stage still samples
    pairs (the pool, validation, both final draws), one pool and one validation fewer (~7 s of 23)."""
    assert main(["distill", "--task", task, "--preset", "smoke", "--set", "outer_loops=1", "-o", str(tmp_path)]) == 0
    assert "DPC 2: 2 set(s)" in capsys.readouterr().out
    t = load_task(task)
    s = read_set(tmp_path / "sets" / "dpc2" / "set00.jsonl", t.label_names, t.is_pair)
    assert s.counts() == [2] * t.num_classes
    assert all(bool(e.text_pair) == t.is_pair for e in s.examples)


# --------------------------------------------------------------------------- what the matching is fed


class Recording(list):
    """A list that records which indices were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_task):
    cfg = DistillConfig.from_preset("smoke", inner_loop=3, generate_interval=2, outer_loops=2, n_rep_sets=3,
                                    model_step_per_inner_step=4,
                                    rep_pool_per_class=0, output_dir=str(tmp_path_factory.mktemp("toy")))
    return Distiller(cfg, task=toy_task)


def test_representative_sets_cluster_the_whole_class(toy_run):
    """per class, n_rep_sets k-means runs (k = real_per_class) over the whole class on the pre-trained
    learner's features, the example nearest each centroid."""
    run, cfg = toy_run, toy_run.cfg
    sets = match_stage.representative_sets(run)
    for c, group in enumerate(run.task.by_class()):
        group = [e for e in run.train if e.label == c]  # the training part (validation held out)
        assert len(sets[c]) == cfg.n_rep_sets
        feats = run.features(group)
        for r, rep in enumerate(sets[c]):
            assert len(rep) == len(set(rep)) == cfg.real_per_class
            assert rep == [group[i] for i in kmeans_nearest(feats, cfg.real_per_class, cfg.seed + r, n_init=1)]
    assert sets[0][0] != sets[0][1]  # different seeds, different sets


def test_pool_is_clustered_and_batches_take_one_member_of_every_cluster_in_turn(toy_run):
    """Items 2 and 3: representative sets used in order; the pool holds syn_per_class × inner_loop ×
    generate_interval texts per class, in syn_per_class clusters of the given learner's features; mini-batch
    ``slot`` is member ``slot`` of every cluster (wrapping when a cluster runs out)."""
    run, cfg = toy_run, toy_run.cfg
    learner = run.fresh_learner(0)
    pools = match_stage.regenerate_pool(run, 5, learner)
    for samples, clusters, _ in pools:
        assert len(samples) == cfg.pool_size == cfg.syn_per_class * cfg.inner_loop * cfg.generate_interval
        assert len(clusters) == cfg.syn_per_class
        assert sorted(i for cl in clusters for i in cl) == list(range(len(samples)))
    recorded = [(samples, [Recording(cl) for cl in clusters], ids) for samples, clusters, ids in pools]
    rep_sets = [Recording([run.learner_inputs(s) for s in sets]) for sets in match_stage.representative_sets(run)]
    opt, sched = match_stage.match_optimizer(run)
    state = State(stage="match", step=cfg.lm_steps)
    for slot in range(4):
        match_stage.generator_step(run, state, opt, sched, learner, rep_sets, recorded, slot)
        state.step += 1
    assert rep_sets[0].read == [0, 1, 2, 0]  # in order, then around again
    for _, clusters, _ in recorded:
        for cl in clusters:
            assert cl.read == [slot % len(cl) for slot in range(4)]


def test_inner_learner_uses_the_protocols_optimiser_in_eval_mode(toy_run):
    """AdamW with the protocol's weight decay, warm-up over half of inner_loop × model steps then decay,
    clipping, and no dropout (eval mode: two forward passes agree)."""
    run, cfg = toy_run, toy_run.cfg
    learner = run.fresh_learner(0)
    learner.train()
    opt, sched = match_stage.learner_optimizer(run, learner)
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[0]["initial_lr"] == cfg.learner_lr
    total = cfg.inner_loop * cfg.model_step_per_inner_step
    lrs = [lr * cfg.learner_lr for lr in (linear_warmup_decay(s, total, 0.5) for s in range(total))]
    assert sched.get_last_lr()[0] == pytest.approx(lrs[0]) and lrs[0] < cfg.learner_lr
    match_stage.inner_learner_steps(run, learner, opt, sched)
    assert not learner.training and sched.get_last_lr()[0] == pytest.approx(lrs[cfg.model_step_per_inner_step])
    batch = run.learner_inputs(run.train[:8])
    assert torch.equal(learner(**batch).logits, learner(**batch).logits)


def test_lm_and_matching_optimisers_are_the_references(toy_run):
    """Item 7 (and the matching stage): AdamW with weight decay 0.01, cosine schedules (10 % / 5 % warm-up)."""
    run, cfg = toy_run, toy_run.cfg
    lm = lm_optimizer(LMStageConfig.of(cfg), run.generator, run.device)
    for (opt, sched), lr, total, warm in ((lm, cfg.lm_lr, cfg.lm_steps, int(0.1 * cfg.lm_steps)),
                                          (match_stage.match_optimizer(run), cfg.generator_lr, cfg.total_match_steps,
                                           1)):
        assert opt.param_groups[0]["weight_decay"] == 0.01
        seen = []
        for _ in range(total):
            seen.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        cosine = [lr * (s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
                  for s in range(total)]
        assert seen == pytest.approx(cosine)


class Declining:
    """Validation that only gets worse, and a count of the inner learner's step blocks (stand-ins for the matching
    stage's ``validate`` and ``inner_learner_steps``)."""

    def __init__(self):
        self.seen_states, self.inner_blocks = [], 0
        self.inner_learner_steps_of = match_stage.inner_learner_steps

    def validate(self, ctx, spec, seed):
        self.seen_states.append({k: v.clone() for k, v in ctx.generator.state_dict().items()})
        return 90.0 - 10 * len(self.seen_states)

    def inner_learner_steps(self, *args):
        self.inner_blocks += 1
        self.inner_learner_steps_of(*args)


@pytest.mark.integration
def test_step_zero_is_validated_and_kept_when_matching_only_hurts(tmp_path, toy_task, monkeypatch):
    """Items 6 and 4: the LM-only generator is validated before the first matching step, so a run whose matching
    only lowers validation keeps the LM's generator; the learner takes no steps after an outer loop's last
    generator step."""
    seen = []
    cfg = DistillConfig.from_preset("smoke", output_dir=str(tmp_path), rep_pool_per_class=0)
    declining = Declining()
    monkeypatch.setattr(match_stage, "validate", declining.validate)
    monkeypatch.setattr(match_stage, "inner_learner_steps", declining.inner_learner_steps)
    run = Distiller(cfg, callback=seen.append, task=toy_task)
    result = run.fit()
    vals = [m for m in seen if "val_accuracy" in m]
    assert [m["step"] for m in vals] == [cfg.lm_steps + cfg.inner_loop * o for o in range(cfg.outer_loops + 1)]
    assert result.best_val_accuracy == 80.0
    kept = run.generator.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in declining.seen_states[0].items())
    assert not all(torch.equal(kept[k], v) for k, v in declining.seen_states[-1].items())  # matching did change it
    assert declining.inner_blocks == cfg.outer_loops * (cfg.inner_loop - 1)


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"smoke", "demo"}))
def test_real_presets_validate_on_enough_sets_and_seeds(preset):
    """at least 3 sets × 3 seeds, at the protocol's 200 steps (the CPU presets smoke and demo excepted)."""
    cfg = DistillConfig.from_preset(preset)
    assert cfg.val_sets >= 3 and cfg.val_seeds >= 3 and cfg.val_steps == 200 and cfg.val_interval > 0


def test_paper_preset_is_the_reference_item_by_item():
    """configs/train/lm.yaml and dc.yaml of the DiLM reference code, and its evaluation."""
    cfg = DistillConfig.from_preset("paper")
    reference = {
        "generator": "gpt2", "learner": "bert-base-uncased", "dpc": (5, 10, 20), "n_sets": 20,
        # LM stage: 80k steps, lr 1e-5, AdamW wd 0.01 (cosine, warm-up 0.1, clip 1 are fixed in the code)
        "lm_steps": 80000, "lm_lr": 1e-5, "lm_weight_decay": 0.01, "lm_batch_size": 64,
        # lengths: the longest example (SST-2: 68 GPT-2 tokens), nothing dropped
        "length_quantile": 1.0, "max_length": 0, "max_new_tokens": 0, "drop_unfinished": False,
        # matching: 20,000 steps = 2,000 outer loops × 10, 20 learner steps between generator steps
        "outer_loops": 2000, "inner_loop": 10, "model_step_per_inner_step": 20, "generator_lr": 3e-7,
        "generator_weight_decay": 0.01, "syn_per_class": 64, "real_per_class": 200, "n_rep_sets": 10,
        "rep_pool_per_class": 0, "pool_per_class": 0, "generate_interval": 20, "pooling": "cls",
        "temperature": 1.0, "gen_loss_norm": "batch", "lm_lambda": 0.0, "all_layers": False,
        "learner_lr": 1e-4, "learner_batch_size": 64,
        # validation every 2,000 generator steps and at step 0: 5 sets × 5 seeds at DPC 20, 200 steps
        "val_interval": 200, "val_dpc": 20, "val_sets": 5, "val_seeds": 5, "val_steps": 200,
        # final sets: 100 × DPC candidates, top-p 0.95, k-means nearest-centroid on [CLS], no filter
        "over_sample": 100, "top_p": 0.95, "selection": "kmeans", "label_filter": "none", "select_pooling": "cls",
        "final_sources": "generator",  # of the matched generator only
    }
    assert {k: getattr(cfg, k) for k in reference} == reference
    assert cfg.pool_size == 64 * 10 * 20 == 12800 and cfg.total_match_steps == 20000


def test_learner_encodes_pairs_with_the_pair_api(toy_run):
    """the learner sees a pair as the tokenizer's pair encoding, pre-tokenised rows included."""
    run, tok = toy_run, toy_run.learn_tok
    pairs = [Example("The repair: was costly", 1, "It cost a lot"), Example("A cat sat", 0, "Dogs bark")]
    enc = run.learner_inputs(pairs)
    want = tok([e.text for e in pairs], [e.text_pair for e in pairs], padding=True, return_tensors="pt")
    assert all(torch.equal(enc[k], want[k]) for k in ("input_ids", "token_type_ids"))
    assert enc["token_type_ids"][0].max() == 1  # segment ids: what a joined "a [SEP] b" string never gets
    rows = pad_ids(run.learner_ids(pairs), tok.pad_token_id, "cpu")
    assert all(torch.equal(rows[k], enc[k]) for k in enc)


@pytest.mark.integration
def test_a_shared_final_pool_is_sampled_once_for_every_set(tmp_path, toy_task):
    """``final_pool: shared`` samples one pool of over_sample × largest DPC per class (not one per set), and still
    writes n_sets distinct sets of exactly DPC per class."""
    cfg = DistillConfig.from_preset("smoke", dpc=(2, 3), n_sets=3, over_sample=4, final_pool="shared",
                                    outer_loops=0, output_dir=str(tmp_path))
    run = Distiller(cfg, task=toy_task)
    asked = []
    sample = run.sample
    run.sample = lambda counts, *a, **k: asked.append(list(counts)) or sample(counts, *a, **k)
    result = run.fit()
    assert asked[-1] == [4 * 3] * 2  # the final candidates (each of generator+lm's two draws): one call, all classes
    for dpc, paths in result.sets.items():
        sets = [read_set(p, ("negative", "positive")) for p in paths]
        assert len(sets) == 3 and all(s.counts() == [dpc, dpc] for s in sets)
    texts = [tuple(sorted(e.text for e in read_set(p, ("negative", "positive")).examples)) for p in result.sets[3]]
    assert len(set(texts)) > 1  # the sets choose from different halves


@pytest.mark.integration
def test_step0_validation_is_computed_once_for_runs_that_differ_only_in_matching(tmp_path, monkeypatch, toy_task):
    """From one LM checkpoint, the step-0 validation (the LM-only generator) of a config is kept on disk: a run that
    differs only in matching keys reads it instead of validating again, and what it reads is what it would have
    computed (same value, same final sets); a field the validation reads gives another entry."""
    from dilm.distill import train_lm

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    calls = []
    real_validate = match_stage.validate
    monkeypatch.setattr(match_stage, "validate",
                        lambda ctx, spec, seed: calls.append(seed) or real_validate(ctx, spec, seed))
    base = DistillConfig.from_preset("smoke", learner="minilm-l6", probe="", label_filter="none", outer_loops=1,
                                     n_sets=1, output_dir=str(tmp_path / "lm-run"))  # one final set: its candidates
    lm = str(train_lm(base, tmp_path / "lm", task=toy_task))                      # are sampled by all three runs

    def run(name: str, **changes):
        seen = []
        result = distill(dataclasses.replace(base, lm_checkpoint=lm, output_dir=str(tmp_path / name), **changes),
                         callback=seen.append, task=toy_task)
        step0 = next(m["val_accuracy"] for m in seen if "val_accuracy" in m)
        texts = [p.read_text() for paths in result.sets.values() for p in paths]
        return step0, texts

    entries = lambda: sorted((tmp_path / "cache" / "validation").glob("*.json"))  # noqa: E731
    a = run("a")
    assert len(calls) == 2 and len(entries()) == 1  # step 0 and after the outer loop
    b = run("b", generator_lr=3e-4, temperature=0.5, inner_loop=3)
    assert len(calls) == 3 and len(entries()) == 1 and b[0] == a[0]  # step 0 read: one validation, after the loop
    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "empty"))
    assert run("b-computed", generator_lr=3e-4, temperature=0.5, inner_loop=3) == b and len(calls) == 5
    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))

    def key(**changes):
        ctx = Distiller(dataclasses.replace(base, **{"lm_checkpoint": lm, **changes}), task=toy_task)
        return match_stage.step0_cache_path(ctx, match_stage.ValidationSpec.of(ctx.cfg))

    assert key(generator_lr=3e-4, inner_loop=3, n_sets=5, final_mix="pooled") == entries()[0]  # the final sets' keys
    assert key(val_steps=3) != entries()[0] and key(top_p=0.5) != entries()[0] and key(lm_checkpoint="") is None


@pytest.mark.integration
@pytest.mark.parametrize(("sources", "draws"), [("generator+lm", 2), ("generator", 1)])
def test_final_candidates_of_the_lm_only_generator_are_sampled_once(tmp_path, monkeypatch, toy_task, sources, draws):
    """The vanilla-LM run (outer_loops 0) and a matched run that kept the step-0 generator sample the same final
    candidates (generator+lm: two draws of the LM's; generator, the reference's: one): the first samples them, the
    second reads them (same sets); a run whose matching validated higher samples its own draw."""
    from dilm.distill import train_lm
    from dilm.distill.candidates import GENERATOR_DRAW, final_seed
    from dilm.distill.context import RunContext

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    base = DistillConfig.from_preset("smoke", probe="", label_filter="none", outer_loops=1, final_sources=sources,
                                     output_dir=str(tmp_path / "lm-run"))
    lm = str(train_lm(base, tmp_path / "lm", task=toy_task))
    seeds = {final_seed(base), final_seed(base, GENERATOR_DRAW)}
    assert len(seeds) == draws  # generator+lm: the pool's halves are two draws; generator: one seed
    finals = []
    real_sample = RunContext.sample
    monkeypatch.setattr(RunContext, "sample", lambda self, counts, seed, names=None: (
        finals.append(seed) if seed in seeds else None) or real_sample(self, counts, seed, names))

    def run(name: str, accuracies: list[float], **changes) -> list[str]:
        left = iter(accuracies)
        monkeypatch.setattr(match_stage, "validate", lambda ctx, spec, seed: next(left))
        result = distill(dataclasses.replace(base, lm_checkpoint=lm, output_dir=str(tmp_path / name), **changes),
                         task=toy_task)
        return [p.read_text() for paths in result.sets.values() for p in paths]

    vanilla = run("vanilla", [], outer_loops=0)
    assert len(finals) == draws and len(list((tmp_path / "cache" / "candidates").glob("*.json"))) == draws
    assert run("kept-step-0", [50.0, 50.0]) == vanilla and len(finals) == draws  # read, not sampled
    run("matched", [50.0, 60.0])  # its generator's draw, sampled (not kept); the LM's half, read
    assert len(finals) == draws + 1 and len(list((tmp_path / "cache" / "candidates").glob("*.json"))) == draws


class FinalDraws:
    """Runs of a smoke config with ``final_sources`` generator+lm, recording the order of matching and final-candidate
    draws (``events``: ``lm`` the LM's half, ``gen`` the run's generator's), each draw (``drawn``) and each pool the
    final sets were selected from (``pools``)."""

    def __init__(self, tmp_path, monkeypatch, task):
        from dilm.distill import run as run_module
        from dilm.distill import select as select_module
        from dilm.distill.candidates import GENERATOR_DRAW, LM_DRAW, final_seed
        from dilm.distill.context import RunContext

        self.tmp, self.mp, self.task = tmp_path, monkeypatch, task
        self.base = DistillConfig.from_preset("smoke", probe="", label_filter="none", outer_loops=1,
                                              final_pool="shared", final_sources="generator+lm",
                                              output_dir=str(tmp_path / "lm-run"))
        self.events, self.drawn, self.pools = [], [], []
        draws = {final_seed(self.base, LM_DRAW): "lm", final_seed(self.base, GENERATOR_DRAW): "gen"}
        sample, match, pool = RunContext.sample, run_module.match, select_module.select_from_pool

        def recorded(ctx, counts, seed, names=None):
            got = sample(ctx, counts, seed, names)
            if seed in draws:
                self.events.append(draws[seed])
                self.drawn.append(got)
            return got

        monkeypatch.setattr(RunContext, "sample", recorded)
        monkeypatch.setattr(run_module, "match", lambda *a: self.events.append("match") or match(*a))
        monkeypatch.setattr(select_module, "select_from_pool",
                            lambda ctx, cands, *a: self.pools.append(texts(cands)) or pool(ctx, cands, *a))

    def run(self, name: str, accuracies: list[float], **changes) -> Distiller:
        """One run whose validations score ``accuracies`` in turn (step 0 first)."""
        left = iter(accuracies)
        self.mp.setattr(match_stage, "validate", lambda ctx, spec, seed: next(left))
        run = Distiller(dataclasses.replace(self.base, output_dir=str(self.tmp / name), **changes), task=self.task)
        run.fit()
        return run


def texts(pool) -> list[list[tuple]]:
    return [[(s.text, s.text_pair) for s in c] for c in pool]


def union(lm, matched) -> list[list[tuple]]:
    """Per class, the LM's candidates, then the matched generator's that are not among them."""
    return [c + [s for s in m if s not in c] for c, m in zip(texts(lm), texts(matched))]


@pytest.mark.integration
def test_final_sources_generator_and_lm_with_the_lm_stage_in_the_run(tmp_path, monkeypatch, toy_task):
    """``final_sources: generator+lm`` with the LM stage in the run: the LM's candidates are sampled before matching
    (its weights are not kept) into the run's folder, and the final sets select among them followed by the matched
    generator's ones the LM did not also write. A resumed run that lost them fails before matching, in one line; a
    fresh LM stage forgets the candidates of an earlier one."""
    from dilm.distill.candidates import IN_RUN_LM_CANDIDATES, final_counts, keep_lm_candidates, lm_candidates

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    draws = FinalDraws(tmp_path, monkeypatch, toy_task)
    run = draws.run("in-run", [50.0, 60.0])
    kept = list((tmp_path / "in-run").glob(IN_RUN_LM_CANDIDATES))
    assert draws.events == ["lm", "match", "gen"] and len(kept) == 1
    lm, matched = draws.drawn
    assert draws.pools[-1] == union(lm, matched) and len(draws.pools[-1][0]) > len(lm[0])
    assert run.timings["lm_candidates_s"] > 0

    kept[0].unlink()
    with pytest.raises(DilmError, match="LM stage's candidates are not in .*resume it with final_sources generator"):
        keep_lm_candidates(run, State(stage="match", step=run.cfg.lm_steps + 2, outer=1))
    with pytest.raises(DilmError, match="LM stage's candidates of this run are not on disk"):
        lm_candidates(run, *final_counts(run), generator_is_lm=False)
    kept[0].write_text("[]")  # an earlier run's: a fresh LM stage in the folder must not read it
    (tmp_path / "in-run" / "checkpoint").rename(tmp_path / "old-checkpoint")
    draws.events.clear(), draws.drawn.clear()
    draws.run("in-run", [50.0, 60.0])
    assert draws.events == ["lm", "match", "gen"] and draws.pools[-1] == union(*draws.drawn)
    draws.events.clear(), draws.drawn.clear()
    draws.run("in-run-kept-step-0", [50.0, 50.0])  # the generator holds the LM's weights again: its half is the LM's
    assert draws.events == ["lm", "match", "gen"] and draws.pools[-1] == union(*draws.drawn)
    assert len(list((tmp_path / "in-run-kept-step-0").glob(IN_RUN_LM_CANDIDATES))) == 2  # both kept


@pytest.mark.integration
def test_final_sources_generator_and_lm_from_an_lm_checkpoint(tmp_path, monkeypatch, toy_task):
    """From an LM checkpoint the LM's candidates are read from the cache the vanilla run filled, or, with nothing
    on disk, sampled after matching with the checkpoint's weights swapped in (the vanilla run's candidates) and the
    matched weights back. The vanilla run's pool is two draws of the LM's, so the pool's size does not depend on
    whether matching was kept; a run that kept the step-0 generator selects from exactly the vanilla run's pool."""
    from dilm.distill import train_lm
    from dilm.distill.checkpoint import load_lm_checkpoint

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    draws = FinalDraws(tmp_path, monkeypatch, toy_task)
    lm_dir = str(train_lm(draws.base, tmp_path / "lm", task=toy_task))
    draws.run("vanilla", [], outer_loops=0, lm_checkpoint=lm_dir)
    vanilla, second = draws.drawn
    vanilla_pool = draws.pools[-1]
    assert draws.events == ["match", "lm", "gen"] and vanilla_pool == union(vanilla, second)
    assert len(vanilla_pool[0]) > len(vanilla[0])  # two draws of the LM's
    draws.run("matched", [50.0, 60.0], lm_checkpoint=lm_dir)
    assert draws.events[3:] == ["match", "gen"]  # the LM's half read from the vanilla run's
    matched = draws.drawn[2]
    assert draws.pools[-1] == union(vanilla, matched)
    draws.run("kept-step-0", [50.0, 50.0], lm_checkpoint=lm_dir)
    assert draws.events[5:] == ["match"] and draws.pools[-1] == vanilla_pool  # both halves read: vanilla's pool

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "empty"))
    draws.events.clear(), draws.drawn.clear()
    alone = draws.run("alone", [50.0, 60.0], lm_checkpoint=lm_dir)
    assert draws.events == ["match", "lm", "gen"] and texts(draws.drawn[0]) == texts(vanilla)
    assert draws.pools[-1] == union(draws.drawn[0], draws.drawn[1])
    checkpoint = load_lm_checkpoint(lm_dir, alone.cfg, toy_task, alone.template, "cpu").state_dict()
    assert any(not torch.equal(v, checkpoint[k]) for k, v in alone.generator.state_dict().items())  # its own again

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "empty-again"))  # kept step 0, nothing on disk: both halves are
    draws.events.clear(), draws.drawn.clear()                          # sampled by the generator, back at the LM's
    draws.run("kept-step-0-alone", [50.0, 50.0], lm_checkpoint=lm_dir)  # weights: the vanilla run's pool again
    assert draws.events == ["match", "lm", "gen"] and draws.pools[-1] == vanilla_pool


@pytest.mark.integration
@pytest.mark.parametrize("final_pool", ["shared", "per_set"])
def test_a_split_mix_gives_each_draw_its_share_of_every_final_set(tmp_path, monkeypatch, toy_task, final_pool):
    """``final_mix: split``: every final set holds DPC//2 texts per class of the LM stage's draw and the rest of the
    matched generator's (the pooled mix chooses among both together: no share is promised), whether the sets share
    one pool or each samples its own."""
    from dilm.synset import read_set

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    draws = FinalDraws(tmp_path, monkeypatch, toy_task)
    run = draws.run("split", [50.0, 60.0], final_mix="split", dpc=(4,), final_pool=final_pool)
    assert draws.events == ["lm", "match", "gen"]
    lm, pools = [set(row) for row in texts(draws.drawn[0])], [set(row) for row in union(*draws.drawn)]
    paths = sorted((tmp_path / "split" / "sets" / "dpc4").glob("set*.jsonl"))
    assert len(paths) == run.cfg.n_sets
    for k, path in enumerate(paths):
        got = read_set(path, toy_task.label_names)
        for c in range(toy_task.num_classes):
            row = c if final_pool == "shared" else k * toy_task.num_classes + c  # the rows set k selected from
            chosen = [(e.text, e.text_pair) for e in got.examples if e.label == c]
            assert len(chosen) == 4 and set(chosen) <= pools[row]
            assert sum(t in lm[row] for t in chosen) == 2  # two of the LM's draw, two of the matched generator's


def test_token_limits_of_a_packaged_generator_are_kept_on_disk(tmp_path, monkeypatch, toy_task):
    """The data's token limits need the whole training split tokenised (8 s a process on SST-2): with a packaged
    generator a second run reads them, and another quantile or cap gives another entry."""
    from dilm.generator import TokenizedCorpus
    from dilm.models import smollm2_dir

    # an empty cache dir, but for the de-quantized SmolLM2 (half a minute to rebuild), linked in
    dequantized = smollm2_dir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / dequantized.name).symlink_to(dequantized)
    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    cfg = DistillConfig.from_preset("smoke", generator="smollm2-135m", output_dir=str(tmp_path / "o"))
    first = Distiller(cfg, task=toy_task).limits
    entries = list((tmp_path / "cache" / "limits").glob("*.json"))
    assert len(entries) == 1 and first["max_new_tokens"] < first["max_length"] <= cfg.length_cap

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the training split was tokenised again")

    monkeypatch.setattr(TokenizedCorpus, "build", no_tokenising)
    assert Distiller(cfg, task=toy_task).limits == first  # read from disk
    with pytest.raises(AssertionError, match="tokenised again"):
        Distiller(dataclasses.replace(cfg, length_quantile=0.5), task=toy_task).data_limits()
