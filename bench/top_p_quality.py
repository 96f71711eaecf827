"""Readability and label agreement of a generator's samples at several top_p values — the measurement behind the
``demo`` preset's top_p 0.6 (README, "make demo"). Named baseline: the reference's top_p 0.95, sampled in the
same run; every other row prints its difference to it.

    python bench/top_p_quality.py runs/sweeps/lm/<key> --top-p 0.95,0.8,0.6      # a shared LM-stage checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dilm.generator import make_sampler, resolve_template, sample_classes
from dilm.options import strs
from dilm.probe import LabelProbe
from dilm.sampling import SamplingSpec
from dilm.tasks import load_task
from tune.report import task_vocabulary, word_rate

BASELINE = 0.95


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="generator checkpoint (e.g. an LM-stage checkpoint of a sweep)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--top-p", type=strs, default=("0.95", "0.8", "0.6"), help="comma-separated; 0.95 is added")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=44)
    args = p.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    gen = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    task = load_task(args.task)
    names, template = list(task.label_names), resolve_template("task", args.task)
    vocabulary = task_vocabulary(task)
    probe = LabelProbe.for_task(task, "minilm-l6", device, max_examples=4000)
    spec = SamplingSpec(template=template, is_pair=task.is_pair, max_new_tokens=args.max_new_tokens, batch_size=64)
    sampler = make_sampler(gen, tok, device, spec, names)
    values = [BASELINE] + [v for v in map(float, args.top_p) if v != BASELINE]
    base = None
    for top_p in values:
        t = time.perf_counter()
        out = sample_classes(sampler, tok, names, [args.per_class] * len(names), 1,
                             dataclasses.replace(spec, top_p=top_p))
        rate = word_rate([f"{s.text} {s.text_pair or ''}" for group in out for s in group], vocabulary)
        agree = 100 * probe.agreement(out)
        base = base or (rate, agree)
        print(f"top_p {top_p}: {rate:.1f} % of words in the training vocabulary ({rate - base[0]:+.1f} vs "
              f"{BASELINE}), label agreement {agree:.1f} % ({agree - base[1]:+.1f}), n={sum(map(len, out))}, "
              f"{time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
