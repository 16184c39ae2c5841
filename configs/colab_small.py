r"""LaSeR on a small instruct model on one accelerator (Colab T4/L4/A100 or a single TPU host).

Launch (the model is the hub id Qwen/Qwen2.5-0.5B-Instruct, fetched once with huggingface_hub;
the training problems are your JSONL/parquet file):
  python -m laser_jax.train --config=configs/colab_small.py \
      --config.data.train_files=/content/train.jsonl --config.workdir=/content/laser_run
Use --config.model.hf_path=Qwen/Qwen2.5-1.5B-Instruct on a 40 GB+ card.
Compute dtype and attention follow the device (model.dtype/attention "auto"): bfloat16 with
cuDNN flash attention on A100 / L4 / H100, the splash kernel on TPU, float32 with the chunked
attention on a T4 (compute capability 7.5: no bf16, no cuDNN flash attention).
"""
from laser_jax import default_config


def get_config():
  """Qwen2.5-0.5B-Instruct on MATH-style problems, short responses, one device."""
  c = default_config.get_config()
  c.workdir = "/content/laser_run"  # Colab's local disk (or a mounted Drive folder).
  c.total_steps = 100
  c.checkpoint_every = 20
  c.eval_every = 20
  c.batch_size = 8  # Prompts per step.
  # Responses per forward/backward (fits 16 GB at 1k tokens in bf16; on a T4, float32 activations
  # take twice the memory: halve it if the update runs out).
  c.micro_batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1  # All local devices (1 GPU, or the 4-8 cores of a TPU host).
  c.mesh.tensor = 1

  c.model.hf_path = "Qwen/Qwen2.5-0.5B-Instruct"  # A hub id (fetched once), or a local directory.
  c.model.dtype = "auto"  # bfloat16 where native (A100 / L4 / H100, TPU), else float32 (T4).
  c.model.attention = "auto"  # cuDNN flash (GPU, bf16), splash (TPU), else chunked (T4).
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.model.logprob_chunk = 256

  c.data.task = "files"
  c.data.train_files = "/content/train.jsonl"  # JSONL with "problem" and "answer".
  c.data.template = "chat"
  c.data.max_prompt_len = 512
  c.data.eval_set = "math500"
  c.data.eval_size = 64  # A quick validation subset.

  c.rollout.n = 8
  c.rollout.max_new_tokens = 1024
  c.rollout.recompute_old_logprobs = True

  c.sft.steps = 0  # No supervised warm start: an instruct model already answers in \boxed{}.
  c.reward.fn = "math"
  c.reward.num_workers = 2
  c.optim.lr = 1e-6

  c.laser.loss_coef = 0.1  # alpha, the paper's value.
  c.laser.kl_coef = 0.1  # beta_v, the paper's value (0.1 * 23 = 2.3 >= 1.5: both targets reachable).
  c.laser.ref_constant = -23.0  # Qwen2.5 family; calibrate with `python -m laser_jax.calibrate`.
  c.laser.self_reward_token_id = 151652  # <|vision_start|>
  c.laser.reasoning_warmup_steps = 0  # Short run: self-rewarding loss from the start.
  c.laser.self_rewarding_warmup_steps = 20
  c.eval.n = 2
  c.eval.max_new_tokens = 1024
  return c
