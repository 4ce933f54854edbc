"""The runs layer: who owns a run. It sits above :mod:`segkd.engine` (the loop, hooks, tasks) and
:mod:`segkd.methods` (distillation methods and tasks) and below the commands (cli, bench, report):

* :mod:`segkd.runs.rundir`: the run directory (lock, orphans, refusals, run id, resume binding, config.yaml);
* :mod:`segkd.runs.train`: ``segkd train`` and :func:`~segkd.runs.train.run_task`, which composes data, a task
  builder and the engine for every command;
* :mod:`segkd.runs.distill`: ``segkd distill`` (its config, task builder, data, distill.json).
"""
