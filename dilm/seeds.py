"""Seeds of sub-tasks derived from one run seed.

``derive_seed(seed, "pool", class_id, round)`` names what it seeds, so that two streams never share a seed by
arithmetic accident (``seed * 7919 + c`` of one run equals another formula's value for a neighbouring run or
class). The mixing is NumPy's ``SeedSequence`` hash; strings are mapped to integers by CRC-32 (stable across
processes, unlike ``hash``).
"""

from __future__ import annotations

import zlib

import numpy as np

from dilm import DilmError


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 31-bit seed (valid for ``random``, ``numpy``, ``torch`` and scikit-learn) determined by ``seed`` and
    ``parts``; equal arguments give equal seeds, different ones independent-looking seeds."""
    words = [int(seed)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    if any(w < 0 for w in words):
        raise DilmError(f"a seed must be >= 0, got {seed} (parts {parts})")
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)
