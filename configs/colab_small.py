r"""LaSeR on a small instruct model on one accelerator (Colab T4/L4/A100 or a single TPU host).

Launch:
  python -m laser_jax.train --config=configs/colab_small.py \
      --config.model.hf_path=/content/Qwen2.5-0.5B-Instruct --config.workdir=/content/laser_run
Use Qwen2.5-1.5B-Instruct on a 40 GB+ card by pointing hf_path at it.
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
  c.micro_batch_size = 8  # Responses per forward/backward (fits 16 GB at 1k tokens in bf16).
  c.mesh.data = 1
  c.mesh.fsdp = -1  # All local devices (1 GPU, or the 4-8 cores of a TPU host).
  c.mesh.tensor = 1

  c.model.hf_path = "/content/Qwen2.5-0.5B-Instruct"  # Downloaded with huggingface_hub when online.
  c.model.dtype = "bfloat16"
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
