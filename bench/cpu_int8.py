"""The sampler's inference copy as int8 dynamic quantisation (``torch.ao.quantization.quantize_dynamic`` of every
``nn.Linear``) against the fp32 model it samples today, on a CPU — speed and what it does to the texts. Named
baseline: fp32, sampled in the same run with the same prompts and seeds; each repetition times both, interleaved.

    python bench/cpu_int8.py runs/sweeps/lm/<key> [--rows 256] [--reps 2] [--threads 1] [--json out.json]

Prints per precision: samples/s (and its ratio to fp32), new tokens/s, the probe's label agreement (%) and the mean
words per text. Issue #20 asked whether int8 pays on the sampler's copy (2026-12-01: it does not; see
bench/results/2026-12-01-cpu-int8.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from dilm.generator import make_sampler, prompt, resolve_template, to_sample
from dilm.models import load_model, load_tokenizer
from dilm.probe import LabelProbe
from dilm.sampling import SamplingSpec
from dilm.tasks import load_task

CPU = torch.device("cpu")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="generator checkpoint (e.g. a sweep's shared LM-stage checkpoint)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--rows", type=int, default=256, help="rows sampled per repetition (the classes in turn)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a sweep trial's one)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--top-p", type=float, default=0.6, help="the demo preset's")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    task = load_task(a.task)
    names = list(task.label_names)
    tok = load_tokenizer("smollm2-135m")
    fp32 = load_model(str(a.checkpoint), "causal-lm", device=CPU).eval()
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    template = resolve_template("task", a.task)
    sampler = make_sampler(fp32, tok, CPU, SamplingSpec(template=template, max_new_tokens=a.new_tokens, top_p=a.top_p,
                                                       batch_size=a.rows), names)
    prompts = [tok(prompt(n, template), add_special_tokens=False)["input_ids"] for n in names]
    rows = [prompts[i % len(names)] for i in range(a.rows)]
    probe = LabelProbe.for_task(task, "minilm-l6", CPU, max_examples=4000)
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for rep in range(a.reps):
        for name, model in (("fp32", fp32), ("int8", int8)):
            sampler.model = model  # the inference copy the decode loop runs
            t = time.perf_counter()
            got = sampler.sample(rows, seed=rep)
            dt = time.perf_counter() - t
            by_class: list[list] = [[] for _ in names]
            for i, r in enumerate(got):
                s = to_sample(r, rows[i], tok, task.is_pair)
                if s is not None:
                    by_class[i % len(names)].append(s)
            texts = [s.text for c in by_class for s in c]
            runs[name].append({"s": dt, "samples_per_s": len(rows) / dt, "new_tokens_per_s": sum(map(len, got)) / dt,
                               "label_agreement": 100 * probe.agreement(by_class), "usable": len(texts),
                               "mean_words": statistics.mean(len(x.split()) for x in texts)})
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs, "median": {}}
    base = statistics.median(r["samples_per_s"] for r in runs["fp32"])
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out["median"][name] = med | {"x_fp32": med["samples_per_s"] / base}
        print(f"{name:5s} {med['samples_per_s']:6.2f} samples/s ({med['samples_per_s'] / base:.2f}x fp32), "
              f"{med['new_tokens_per_s']:6.1f} new tokens/s, label agreement {med['label_agreement']:.1f} %, "
              f"{med['mean_words']:.1f} words/text", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
