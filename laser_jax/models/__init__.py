"""The policy network and how it lies on devices.

`config` (ModelConfig and its numerics per device), `model` (the Flax decoder: full forward for
training, cached prefill / decode for sampling), `attention` (its kernels), `sharding` (the
(data, fsdp, tensor) mesh and a partition spec for every weight, activation and cache tensor),
`hosts` (each host's rows of a global batch), `hf` (Hugging Face import / export), `presets`
(shapes of the real models). Imports nothing else of laser_jax.
"""
