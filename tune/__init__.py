"""Ray Tune sweeps over the fine-tune of `pipelines.train` (`python -m jobs.sweep`).

`tune.search`: the sweep config (base fine-tune config, search space, ASHA, search algorithm) and its checks.
`tune.trial`: one trial, a function trainable running `train()` and reporting each epoch's validation metric.
`tune.runner`: the Tuner, resume, MLflow parent/child runs, the best config and the registry.
`tune.report`: the table and the plot.
"""
