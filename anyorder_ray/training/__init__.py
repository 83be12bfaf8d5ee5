"""Pure training components (no Ray): the masked objective, optimiser and schedule, step budgets, checkpoints,
FSDP2 sharding, and the training recipe that the Ray train function only drives."""
