"""Orchestration of DiLM experiments: everything that touches Ray, Optuna or MLflow lives here, never in ``dilm``.

* :mod:`tune.sweep` — ``python -m tune.sweep`` / ``dilm sweep``, the driver: Ray Tune trials of ``dilm.distill.distill``
  searched by Optuna TPE, stopped early by ASHA, resumable after a crash;
* :mod:`tune.config` — the sweep YAML schema and the storage layout;
* :mod:`tune.trial` — one trial (the Tune trainable): distill, score on the pool, report the objective;
* :mod:`tune.search` — the Optuna searcher and ASHA scheduler adapters and the Tune callback (Ray internals);
* :mod:`tune.report` — the sweep's summary and parameter importances;
* :mod:`tune.pool` — the evaluation actor pool that scores every trial's synthetic sets across architectures;
* :mod:`tune.tracking` — MLflow parent/child runs (the only module importing mlflow) and ``dilm ui``;
* :mod:`tune.plots` — the figures logged as artifacts.

Sweep configurations are data: ``sweeps/*.yaml``.
"""
