"""The Ray roles, the only code that imports Ray: the trajectory buffer actor, rollout actors, the train function
that drives the training recipe inside a TorchTrainer, the eval actor and the Tune trial."""
