"""Pure data components (no Ray): mask sampling, tokenizers, the one encoder of training and evaluation, batch
layouts, seed ranges and trajectory files. The ``Trajectory`` record itself lives in ``envs.trajectory``."""
