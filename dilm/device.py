"""Device, precision and threads: where a process computes and in which dtype, decided once and passed in.

``pick_device`` chooses the device; ``inference_dtype`` the dtype of an inference copy (the sampler's);
``autocast_dtype`` / ``autocast`` the mixed precision of training and evaluation (fp32 master weights either way);
``cpu_threads`` / ``use_cpu_threads`` torch's intra-op threads; ``gpu_paths`` whether work takes the code paths
written for a GPU (on a CPU too, with ``$DILM_GPU_PATHS``), ``device_kind`` the device as cache keys name it;
``training_attention`` the attention kernel of training steps.
Nothing here calls ``.cuda()``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from dilm import DilmError


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → cuda if present else cpu; asking for cuda where there is none is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DilmError(f"device {requested!r} requested but no CUDA GPU is available on this machine")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise DilmError(f"unknown device {requested!r}; use auto, cpu or cuda[:N]") from None


GPU_PATHS_ENV = "DILM_GPU_PATHS"


def gpu_paths(device: torch.device | str) -> bool:
    """Whether work on ``device`` takes the code paths written for a GPU: always on CUDA; on the CPU when
    ``$DILM_GPU_PATHS`` is set (to anything but ``0`` or nothing). The switch runs a GPU run's code on a CPU, at
    tiny scale in ``tests/test_gpu_paths.py``: the vmap ensemble with ``ensemble`` members at once and no worker
    processes, the sampler's batched host checks and full-vocabulary top-p, and bf16 as on a bf16 GPU (autocast in
    the method's stages, a bf16 sampler copy; emulated where the CPU lacks native bf16). What only CUDA has (CUDA
    graphs, CUDA random generators) stays on ``device.type == "cuda"``. Every branch between a GPU's path and the
    CPU's asks this, never ``device.type``."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get(GPU_PATHS_ENV, "") not in ("", "0"))


def device_kind(device: torch.device | str) -> str:
    """The device as cache keys name it: its type, and ``cpu+gpu-paths`` for a CPU on the GPU's paths (other
    dtypes: its results are not a plain CPU's)."""
    kind = torch.device(device).type
    return f"{kind}+gpu-paths" if kind == "cpu" and gpu_paths(device) else kind


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16). Elsewhere (AVX2 CPUs) bf16 matmuls
    are emulated and slower than fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probes):
        return torch.backends.mkldnn.is_available() and any(probe() for probe in probes if probe)
    try:  # an older torch without the probes: the kernel's flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    """bf16 pays on this device: a GPU that supports it, or a CPU with native bf16 (:func:`cpu_has_bf16`) or on the
    GPU's paths (:func:`gpu_paths`: the CPU stands for a bf16 GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (cpu_has_bf16() or gpu_paths(device))


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of an inference copy of a model (the sampler's): ``auto`` → bf16 where it pays
    (:func:`bf16_supported`), fp32 elsewhere; ``fp32`` / ``bf16`` as asked."""
    if precision not in PRECISIONS:
        raise DilmError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cpu_threads(limit: float | None = None) -> int:
    """Torch threads for this process: the CPUs it may run on (its affinity mask), at most ``OMP_NUM_THREADS``
    when set (Ray sets it to a task's ``num_cpus``) and at most ``floor(limit)``; at least 1.

    Never more: a thread beyond the CPUs the process has waits at every parallel region for a CPU that another
    process holds (two threads beside a busy process ran an LM step several times slower than one).
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.strip().isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    if limit is not None:
        n = min(n, int(limit))
    return max(1, n)


def use_cpu_threads(limit: float | None = None) -> int:
    """Set torch's intra-op threads to :func:`cpu_threads` (``limit``) and return the number."""
    n = cpu_threads(limit)
    torch.set_num_threads(n)
    return n


def autocast_dtype(device: torch.device, precision: str | None = None) -> torch.dtype | None:
    """The autocast dtype (fp32 master weights either way). ``precision`` None (the method's stages): bf16 on GPUs
    that support it and on a CPU on the GPU's paths (:func:`gpu_paths`), none on other CPUs; ``auto``: bf16 where it
    pays (:func:`bf16_supported`: such a GPU, or a CPU with native bf16), ``bf16`` always, ``fp32`` never (the
    evaluation learners, :class:`~dilm.protocol.EvalConfig`)."""
    if precision is None:
        return torch.bfloat16 if gpu_paths(device) and bf16_supported(device) else None
    if precision not in PRECISIONS:
        raise DilmError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str | None = None):
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# On a CPU the eager attention's backward beats SDPA's for short sequences (SmolLM2-135M, 8 rows, bf16 autocast,
# forward + backward: 0.76 vs 0.95 s at 34 tokens, 2.12 vs 2.38 s at 128, level at 256; MiniLM-L6, 20 rows of 34
# tokens, one thread: 225 vs 250 ms); its forward alone does not (MiniLM-L6 predicting 256 texts: 1.49 vs 1.22 s),
# so inference keeps SDPA, and so do GPUs.
EAGER_UP_TO = 160


@contextlib.contextmanager
def training_attention(model, device, width: int):
    """The attention kernel of a model's training steps on sequences of at most ``width`` tokens: eager on a CPU
    (not on the GPU's code paths, :func:`gpu_paths`) up to ``EAGER_UP_TO`` tokens, the model's own elsewhere; the
    model's own again on leaving (a sampler, the matching stage and predictions keep SDPA). The same loss: both
    kernels take the same masks, packed sequences' ``position_ids`` included."""
    before = getattr(model.config, "_attn_implementation", None)
    use = "eager" if (not gpu_paths(device) and width <= EAGER_UP_TO and before not in (None, "eager")
                      and hasattr(model, "set_attn_implementation")) else None
    if use:
        model.set_attn_implementation(use)
    try:
        yield
    finally:
        if use:
            model.set_attn_implementation(before)
