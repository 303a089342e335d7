"""Training on Ray Train: the job config (`config`), the update rule (`optim`) and the training function."""
