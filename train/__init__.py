"""gptedge.train: the GPT model, its training loop, data and checkpoints (PyTorch)."""

import os

# Idle OpenMP threads should sleep, not spin: on a CPU shared with other work (a laptop, CI) spinning threads
# slow a small model's steps down badly. It takes effect only if torch is not imported yet, hence here, before
# any module of this package imports it; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
