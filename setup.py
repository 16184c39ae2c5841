"""laser_jax: LaSeR (Last-Token Self-Rewarding) RLVR training in JAX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "transformers>=4.50",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "tensorflow-datasets>=4.9",
    # tfds resolves builder code paths with it; without TensorFlow it is not pulled in.
    "importlib_resources>=6",
    "math-verify>=0.7",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "jinja2>=3.1",  # transformers needs it for chat templates (prompt construction).
    "numpy>=1.26",
    "pyarrow>=15",
    # Inputs by address (laser_jax.data.sources): hub ids and hf://datasets/... entries; gs:// through
    # fsspec (gcsfs, in the tpu/gpu extras, provides the gs protocol).
    "huggingface_hub>=0.26",
    "fsspec>=2024.2",
    "absl-py>=2.0",
]

EXTRAS = {
    # Test-only: torch is the independent reference implementation.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        "torch==2.13.0",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "matplotlib>=3.8",
        # libtpu: tests compile the RL step for a TPU slice on the CPU (laser_jax.aot).
        "jax[tpu]; sys_platform == 'linux'",
        # tests/test_launch.py runs launch/tpu.py's setup script locally, which provisions with uv.
        "uv>=0.5",
        # tests of the W&B sink (offline mode: nothing leaves the machine).
        "wandb>=0.19",
    ],
    # gcsfs: gs:// workdirs for metrics.jsonl and TensorBoard (orbax writes gs:// natively).
    "tpu": ["jax[tpu]", "gcsfs"],
    "gpu": ["jax[cuda12]", "gcsfs"],
    "notebook": ["matplotlib>=3.8", "ipykernel>=6.29"],
    # `tensorboard --logdir WORKDIR` reads the events the trainer writes (tensorboardX writes them).
    "tensorboard": ["tensorboard>=2.16"],
    # Weights & Biases sink (config.wandb.project): the TensorBoard scalars and the samples tables.
    "wandb": ["wandb>=0.19"],
    # Benchmarks only: the Tunix comparison (issue 7) pulls in its own stack.
    "bench": ["torch==2.13.0", "matplotlib>=3.8", "google-tunix"],
}

setup(
    name="laser_jax",
    version="0.1.0",
    license="Apache-2.0",
    license_files=["LICENSE"],
    description="LaSeR: RL with last-token self-rewarding, in JAX/Flax for TPU and GPU.",
    packages=find_packages(include=["laser_jax", "laser_jax.*"]),
    package_data={"laser_jax": ["assets/**/*"]},
    include_package_data=True,
    # jax >= 0.7 (and jaxlib, libtpu) require Python 3.11: on an image with
    # 3.10 (Cloud TPU VMs on Ubuntu 22.04) launch/tpu.py provisions 3.11 with uv.
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
