"""Training engine: the step, the loop, evaluation, inference and checkpoints."""
