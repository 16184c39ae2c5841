r"""LaSeR on Qwen2.5-7B-Base with the reference hyperparameters (SPEC.md), on a Cloud TPU v4-64.

Launch (on every worker of the slice; see launch/tpu.py which does exactly this):
  python -m laser_jax.train --config=configs/tpu_v4.py \
      --config.model.hf_path=/mnt/models/Qwen2.5-7B \
      --config.data.train_files=/mnt/data/deepmath-103k.parquet \
      --config.workdir=gs://YOUR_BUCKET/laser/qwen2.5-7b
Check that every program fits on the v4-64 before renting it (any Linux machine, libtpu only):
  python -m laser_jax.aot --config=configs/tpu_v4.py --topology=v4-64
"""
from laser_jax import default_config


def get_config():
  """Reference LaSeR run of the official release (8 GPUs there; a v4-64 slice here)."""
  c = default_config.get_config()
  c.workdir = "gs://YOUR_BUCKET/laser/qwen2.5-7b-base"  # Checkpoints and metrics on GCS.
  c.total_steps = 1600  # ~2 epochs of DeepMath-103K at 128 prompts per step.
  c.checkpoint_every = 20  # A v4 step takes minutes: lose at most 20 steps to a hard failure.
  c.keep_checkpoints = 3
  c.eval_every = 20  # Validation on MATH500 every 20 steps, as the reference.

  c.batch_size = 128  # Prompts per step (reference).
  c.mini_batch_size = 128  # One optimizer step per rollout batch (reference).
  c.micro_batch_size = 32  # Responses per forward/backward on the slice (must be a multiple of 32).

  c.mesh.data = 1
  c.mesh.fsdp = -1  # All 32 chips of a v4-64: parameters and Adam state fully sharded.
  c.mesh.tensor = 1

  c.model.hf_path = "/mnt/models/Qwen2.5-7B"  # Local copy of Qwen/Qwen2.5-7B on every worker.
  c.model.preset = "qwen2.5-7b"  # Its shape, for `laser_jax.aot` where the checkpoint is not.
  c.model.dtype = "bfloat16"  # bf16 compute on the MXU.
  c.model.param_dtype = "float32"  # f32 master weights and Adam moments (lr 1e-6 needs them).
  c.model.remat = True  # 8k-token responses: recompute layer activations in the backward pass.
  c.model.scan_layers = True  # One layer's recomputation alive at a time; one compiled layer.
  c.model.attention = "auto"  # Splash (Pallas flash) kernel on TPU: never holds [10k, 10k] scores.
  c.model.logprob_chunk = 1024  # Never hold [B, 10k, 152k] logits at once.

  c.data.task = "files"
  c.data.train_files = "/mnt/data/deepmath-103k.parquet"  # DeepMath-103K as the release trains on.
  c.data.problem_key = "question"  # DeepMath-103K's problem field.
  c.data.answer_key = "final_answer"  # DeepMath-103K's answer field.
  c.data.template = "chat"  # Qwen chat template + the boxed-answer instruction (SPEC).
  c.data.max_prompt_len = 2048  # Reference max prompt length.
  c.data.eval_set = "math500"  # From data.eval_data_dir / $LASER_JAX_DATA_DIR / ~/.cache/laser_jax/eval_sets.
  c.data.eval_size = 0  # All 500 problems.

  c.rollout.n = 8  # Reference group size.
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.max_new_tokens = 8192  # Reference max response length.
  c.rollout.prompts_per_chunk = 32  # 256 sequences of 10k tokens per sampler call fit the KV cache.
  # Static sampler calls as shipped. Continuous batching with the TPU ragged decode kernel is
  # estimated 56% faster at real lengths (README "Will it fit?": --config.rollout.decode_slots=384
  # --config.rollout.prompts_per_chunk=0 --config.micro_batch_tokens=10241) but not yet run on a TPU.
  # Sample on a bf16 copy of the weights laid out data 8 x tensor 4 (one host's 4 chips per
  # tensor group) instead of gathering the fsdp shards at every token.
  c.rollout.tensor_parallel = 4
  c.rollout.recompute_old_logprobs = True  # bf16 sampler vs training forward: recompute for exact ratios.

  c.reward.fn = "math"  # math-verify on the last \boxed{}.
  c.reward.num_workers = 16  # Verifier processes per host.
  c.reward.timeout_s = 10.0

  c.optim.lr = 1e-6  # Reference learning rate (AdamW, wd 0.01, clip 1.0, constant).
  c.optim.schedule = "constant"

  c.laser.use_self_reward_loss = True
  c.laser.loss_coef = 0.1  # alpha
  c.laser.kl_coef = 0.1  # beta_v
  c.laser.ref_constant = -23.0  # c_ref for Qwen2.5 models.
  c.laser.balanced = True
  c.laser.adv_integration_coef = 0.1  # tau
  c.laser.adv_filter_threshold = 0.1
  # The official training scripts use 200 + 200 warm-up steps for all three models.
  c.laser.reasoning_warmup_steps = 200
  c.laser.self_rewarding_warmup_steps = 200
  c.laser.self_reward_token_id = 151652  # Qwen2.5 <|vision_start|>: never in normal text.

  c.sft.steps = 0  # No supervised warm start for real models.
  c.eval.n = 2  # MATH500 with 2 samples per problem (reference).
  c.eval.temperature = 1.0
  c.eval.max_new_tokens = 8192
  c.mfu_peak_flops = 32 * 275e12  # 32 v4 chips x 275 bf16 TFLOP/s.
  # One sequence per chip and fsdp-sharded contractions: XLA's windowed einsums would re-read and
  # re-write each full [10k, 19k] matmul output once per weight slice (laser_jax.aot: 3.5x the
  # HBM bytes of the log-prob forward); plain all-gathers of the weights instead.
  c.libtpu_init_args = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                        "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")
  return c
