"""Backends: where models, data and prompts come from.

- :mod:`fcr.backends.embedded.model`: the default that runs on a CPU (Fashion-MNIST, MiniLM, small UNets);
- :mod:`fcr.backends.sd.model`: Stable Diffusion checkpoints with local training data and prompt files;
- shared by both: :mod:`.models` (resolving a model name to a UNet), :mod:`.generate` (one sampling
  interface over both) and :mod:`.checks` (per-backend parameter checks before a task starts).
"""
