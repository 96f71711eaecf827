"""The `ray submit` entry point of a sweep: ``python -m tune.sweep ARGS`` in the repository the YAMLs sync (~/dilm).

    ray submit cluster/aws.yaml cluster/sweep.py -- --config sweeps/sst2.yaml --autoscaling

`ray submit` copies the script to ``~`` and runs ``python ~/sweep.py ARGS`` there, with ``~`` first on ``sys.path``.
``tune/sweep.py`` cannot be submitted itself: ``~/dilm``, the synced repository (no ``__init__.py``), is then imported
as a namespace package ``dilm`` that shadows the installed one ("cannot import name 'GIT_REVISION_ENV' from 'dilm'
(unknown location)"). This script imports nothing of dilm: it moves into the repository and replaces itself with the
sweep, so every path means what it means in ``ray exec CLUSTER 'cd ~/dilm && python -m tune.sweep ARGS'``
(``--config sweeps/…``, the default storage ``~/dilm/runs/sweeps``). Standard library only.
"""

import os
import sys
from pathlib import Path

REPO = "~/dilm"  # the YAMLs' file_mounts target (tests/cluster/test_cluster.py checks that they agree)


def main(argv: list[str]) -> None:
    repo = Path(REPO).expanduser()
    if not (repo / "tune" / "sweep.py").is_file():
        sys.exit(f"no dilm repository at {repo}: `ray up` with a cluster/*.yaml syncs it there (file_mounts)")
    os.chdir(repo)
    os.execv(sys.executable, [sys.executable, "-m", "tune.sweep", *argv])  # exit status and signals: the sweep's


if __name__ == "__main__":
    main(sys.argv[1:])
