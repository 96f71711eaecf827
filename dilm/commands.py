"""Sub-commands beyond evaluate/coreset, registered on the parser of :mod:`dilm.cli`."""

from __future__ import annotations
