"""bench/cpu_speed.py's shapes: the demo preset's on the CPU, the gpu preset's with ``--gpu`` (what
bench/distill_speed.py measured before the two merged), a flag over either; read, not run."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from dilm import DilmError
from dilm.distill.config import DistillConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the bench imports record from beside it
    return importlib.import_module("cpu_speed")


def parse(monkeypatch, bench, *args):
    monkeypatch.setattr(sys, "argv", ["cpu_speed.py", *args])
    return bench.arguments()


def preset_shapes(name: str) -> tuple:
    cfg = DistillConfig.from_preset(name)
    return cfg.gen_batch_size, cfg.top_p, cfg.lm_batch_size, cfg.real_per_class, cfg.syn_per_class


def shapes(a) -> tuple:
    return a.sampler_batch, a.top_p, a.lm_batch, a.real_per_class, a.syn_per_class


def test_the_cpu_runs_at_the_demo_presets_shapes(monkeypatch, cpu_speed):
    a = parse(monkeypatch, cpu_speed, "--quick")
    assert shapes(a) == preset_shapes("demo") and a.device.type == "cpu"
    assert (a.rows, a.reps, a.batch, a.new_tokens, a.compile) == (128, 3, 64, 32, False)
    assert parse(monkeypatch, cpu_speed, "--quick", "--top-p", "0.9", "--lm-batch", "2").top_p == 0.9


def test_gpu_runs_at_the_gpu_presets_shapes_on_cuda(monkeypatch, cpu_speed):
    if not torch.cuda.is_available():
        with pytest.raises(DilmError, match="no CUDA GPU"):
            parse(monkeypatch, cpu_speed, "--gpu")
        monkeypatch.setattr(cpu_speed, "pick_device", torch.device)  # the shapes, without a GPU to run them on
    a = parse(monkeypatch, cpu_speed, "--gpu", "--syn-per-class", "8")
    assert shapes(a) == preset_shapes("gpu")[:-1] + (8,) and a.device.type == "cuda"
    assert (a.rows, a.batch, a.new_tokens, a.compile) == (2048, 256, 48, True)
