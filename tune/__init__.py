"""Orchestration of DiLM experiments: everything that touches Ray, Optuna or MLflow lives here, never in ``dilm``
(whose CLI alone hands ``dilm sweep`` and ``dilm ui`` over to this package).

* the driver: :mod:`tune.sweep` (``python -m tune.sweep`` / ``dilm sweep``: Ray Tune trials of ``dilm.distill.distill``
  searched by Optuna TPE, stopped early by ASHA, resumable after a crash), :mod:`tune.config` (the sweep YAML schema),
  :mod:`tune.paths` (the storage layout), :mod:`tune.resume`, :mod:`tune.stop` (SIGTERM as Ctrl-C);
* the trials: :mod:`tune.trial` (the Tune trainable: distill, score on the pool, report the objective),
  :mod:`tune.trial_exit`, :mod:`tune.data` (the task as trials read it), :mod:`tune.search` (the Optuna searcher,
  ASHA and the Tune callback: Ray internals);
* scoring: :mod:`tune.pool` (evaluation actors across architectures), :mod:`tune.baselines`, :mod:`tune.scores`;
* the record: :mod:`tune.tracking` (MLflow parent/child runs), :mod:`tune.ui` (``dilm ui``),
  :mod:`tune.mlflow_server` and :mod:`tune.auth` (a tracking server for other nodes), :mod:`tune.database`
  (``--tracking-db``), :mod:`tune.storage` and :mod:`tune.publish` (URI storage), :mod:`tune.report`,
  :mod:`tune.report_page`, :mod:`tune.plots`.

Sweep configurations are data: YAML files (the repository keeps its own in ``sweeps/``).
"""
