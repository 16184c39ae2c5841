"""Shared test setup.

Eight fake CPU devices are configured before JAX is imported so that sharded code
(data=2, fsdp=2, tensor=2) can be tested on a CPU-only machine; single-device tests
simply run on the default device.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The eval sets' reference files (laser_jax.data looks up named sets there; the product's own
# default is the per-user cache that `python -m laser_jax.data fetch` fills).
os.environ.setdefault("LASER_JAX_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "data"))
