"""The complete default configuration: every key the trainer reads, with its meaning.

These defaults are the embedded tiny CPU run (a ~1M-parameter model learning the synthetic
arithmetic task on two CPU cores). Every file in `configs/` starts from `get_config()` here and
overrides what differs, so a key is documented exactly once, in this file.

Override any key on the command line:
  python -m laser_jax.train --config=configs/tiny_cpu.py --config.total_steps=10 --config.laser.loss_coef=0
"""
import importlib.util
import os

import ml_collections


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/*.py), as `--config=path` would load it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "_laser_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys ({"laser.loss_coef": 0.2}) in place, as `--config.laser.loss_coef=0.2` does."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (tiny CPU, synthetic task) training config."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, data order, sampling and the SFT warm start.
  c.workdir = "/tmp/laser_jax/tiny_cpu"  # Checkpoints, metrics.jsonl, TensorBoard events; may be gs://...
  c.total_steps = 250  # Number of RL steps (one rollout batch + one optimizer step each, by default).
  c.checkpoint_every = 25  # Save a checkpoint every this many RL steps (and at the end / on SIGTERM).
  c.keep_checkpoints = 2  # How many checkpoints orbax keeps in workdir.
  c.async_checkpointing = True  # Write checkpoints in the background while training continues.
  c.log_every = 1  # Print a console summary every this many steps (metrics.jsonl gets every step).
  # Show orbax's INFO logs (dozens of lines per checkpoint save); its warnings always show.
  c.library_info_logs = False
  c.eval_every = 25  # Held-out evaluation every this many steps (0 = never); also at step 0 and the end.
  c.mfu_peak_flops = 0.0  # Peak FLOP/s of the whole slice; when > 0, `mfu` is reported.
  # XLA TPU compiler flags for this run's programs, added to $LIBTPU_INIT_ARGS before the TPU
  # backend starts (laser_jax.train and laser_jax.aot both apply them, so the report compiles
  # what the run executes). Ignored on CPU / GPU.
  c.libtpu_init_args = ""

  # Rollout batch: `batch_size` prompts x `rollout.n` responses per RL step.
  c.batch_size = 32  # Prompts per RL step.
  # Prompts per optimizer step (0 = batch_size: one update per rollout batch); with k updates per
  # batch, update u takes the prompts whose index in the batch is u modulo k.
  c.mini_batch_size = 0
  c.micro_batch_size = 64  # Responses per forward/backward pass; gradients are accumulated exactly.
  # > 0: the update and the log-prob passes pack whole responses into rows of this many tokens,
  # one row per data-parallel shard per micro-batch (laser_jax/rl/packing.py), instead of
  # micro_batch_size padded rows; >= data.max_prompt_len's bucket + rollout.max_new_tokens + 1.
  c.micro_batch_tokens = 0

  # Device mesh. Sizes multiply to the device count; -1 takes all remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Pure data parallelism (replicated parameters).
  c.mesh.fsdp = -1  # Data parallelism with parameters and optimizer state sharded (ZeRO-3 style).
  c.mesh.tensor = 1  # Tensor (Megatron-style) model parallelism.

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # Hugging Face directory (config.json + safetensors + tokenizer) to start from.
  # Or a named shape from laser_jax.models.presets with random init (benchmarks). With hf_path set too,
  # the checkpoint is trained and the preset is the shape `laser_jax.aot` compiles for where the
  # checkpoint is not on the machine.
  c.model.preset = ""
  c.model.tokenizer_path = ""  # Tokenizer directory; "" = hf_path, or the synthetic task's tokenizer.
  # Shape for random init when neither hf_path nor preset is set (the tiny default model).
  c.model.family = "qwen2"  # "qwen2" | "llama" | "qwen3": which block layout to use.
  c.model.vocab_size = 0  # Embedding rows; 0 = the tokenizer's size (benchmarks set a real 32k+).
  c.model.hidden_size = 128
  c.model.intermediate_size = 384
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.rope_theta = 10000.0
  c.model.tie_word_embeddings = True
  # Compute dtype: "float32" | "bfloat16" | "auto" (bfloat16 on TPU and on GPUs of compute
  # capability >= 8.0 such as A100 / L4 / H100; float32 on older GPUs such as Colab's T4, and CPU).
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"  # Parameter (and optimizer state) dtype.
  c.model.remat = False  # Rematerialise each layer in the training forward to save activation memory.
  # Attention of the training / log-prob forward, same values whichever: "xla" (all [T, T] scores
  # at once), "chunked" (attention_block queries at a time, recomputed in the backward: memory
  # ~ block * T), "splash" (Pallas flash kernel, TPU), "cudnn" (cuDNN flash, GPU, bf16), or "auto"
  # (splash on TPU, cudnn on a GPU with bf16 compute and compute capability >= 8.0, chunked
  # otherwise: a T4 gets chunked). With splash, continuous-batching decode (rollout.decode_slots > 0)
  # runs the ragged Pallas kernel too: each slot reads only its own KV-cache prefix.
  c.model.attention = "auto"
  c.model.attention_block = 512  # Queries per block of chunked attention; tile of splash and the ragged decode.
  c.model.scan_layers = False  # Training forward as a lax.scan over the layers (faster compiles, bounded remat).
  c.model.logprob_chunk = 0  # Sequence chunk for the vocab projection in training (0 = whole sequence).

  c.data = ml_collections.ConfigDict()
  c.data.task = "synthetic"  # "synthetic" (built-in arithmetic) | "files" (train_files below).
  # Comma-separated JSONL/parquet entries, each a local path or glob, a gs:// path or glob, or
  # hf://datasets/ORG/NAME[@REV]/GLOB (e.g. hf://datasets/zwhe99/DeepMath-103K/data/*.parquet);
  # each entry's files are read in sorted order (laser_jax.data.sources).
  c.data.train_files = ""
  c.data.problem_key = "problem"  # Field holding the problem text, in JSONL and parquet (DeepMath-103K: "question").
  c.data.answer_key = "answer"  # Field holding the reference answer (DeepMath-103K: "final_answer").
  c.data.template = "chat"  # "chat" (tokenizer's chat template) | "base" (plain text prompt).
  c.data.max_prompt_len = 32  # Prompts longer than this (tokens) are dropped, and counted.
  # Held-out eval: "synthetic", an eval set (math500, aime24, aime25, amc23, olympiadbench: found in
  # eval_data_dir), or files as in train_files (with "problem" and "answer" fields).
  c.data.eval_set = "synthetic"
  # Where named eval sets are (local or gs://; <dir>/<set>/test.jsonl, written by `python -m
  # laser_jax.data fetch --out=DIR`); "" = $LASER_JAX_DATA_DIR, else ~/.cache/laser_jax/eval_sets.
  c.data.eval_data_dir = ""
  c.data.eval_size = 256  # Problems used per periodic evaluation (0 = all).
  c.data.synthetic_train_size = 8000  # Synthetic task: number of training problems.
  c.data.synthetic_eval_size = 256  # Synthetic task: held-out problems (disjoint from training).

  c.rollout = ml_collections.ConfigDict()
  c.rollout.n = 8  # Responses sampled per prompt (the GRPO group size).
  c.rollout.temperature = 1.0  # Sampling temperature, 0 = greedy (the self-reward score always uses T = 1).
  c.rollout.top_p = 1.0  # Nucleus sampling threshold (1.0 = off).
  c.rollout.top_k = 0  # Top-k sampling (0 = off).
  c.rollout.prompts_per_chunk = 0  # Prompts per sampler call (0 = the whole batch): bounds KV-cache memory.
  c.rollout.max_new_tokens = 32  # Response length limit (EOS included); longer ones are truncated.
  # At most this many decode loops per sampler call (each >= 64 tokens), each attending only over
  # the KV cache written so far (about half the attention reads of one loop over the whole
  # cache); each loop is compiled separately.
  c.rollout.decode_segments = 4
  # 0 = static sampler calls; > 0 = continuous batching over this many decode slots: a finished
  # row's slot takes the next row, so a call costs the sum of its lengths, not rows x longest. The
  # rows are the static sampler's (same per-row program and keys: bit for bit at equal batch sizes;
  # a CPU GEMM may round a slots-sized batch in the last bit); a step reads the chunks in use, and
  # on TPU (model.attention splash) each slot only its own KV-cache prefix (ragged Pallas kernel).
  c.rollout.decode_slots = 0
  # Sampling layout. 0: sample with the training layout (weights sharded over fsdp are gathered
  # at every generated token). k > 0: once per RL step the weights are copied in the compute
  # dtype onto a (data = devices / k, tensor = k) mesh of the same devices and sampled there, the
  # copy dropped after: k = a host's chips (4 on v4) keeps every decode collective within a host.
  c.rollout.tensor_parallel = 0
  # Old log-probs: False = the sampler's (same policy, same temperature; exact in f32),
  # True = recomputed with a training forward (bit-consistent with the update, e.g. in bf16).
  c.rollout.recompute_old_logprobs = False

  c.reward = ml_collections.ConfigDict()
  c.reward.fn = "synthetic"  # "math" (math-verify on the last \boxed{}), "synthetic", or "pkg.module:fn".
  c.reward.num_workers = 0  # Verifier worker processes (0 = in-process, no time limit: fine for "synthetic").
  c.reward.timeout_s = 5.0  # Wall-clock limit per answer; a timeout is reward 0 and is counted.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4  # Peak learning rate (the 7B reference runs use 1e-6).
  c.optim.schedule = "constant"  # "constant" | "warmup_cosine".
  c.optim.warmup_steps = 0  # Linear warm-up steps (optimizer steps) for warmup_cosine.
  c.optim.weight_decay = 0.01  # AdamW decoupled weight decay.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0  # Global-norm gradient clipping (0 = off).

  c.loss = ml_collections.ConfigDict()
  c.loss.adv_estimator = "grpo"  # "grpo" (divide by group std) | "drgrpo" (no std division).
  # "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" | "seq-mean-token-sum-norm" (Dr.
  # GRPO: token sums over #sequences * rollout.max_new_tokens).
  c.loss.agg_mode = "token-mean"
  c.loss.clip_eps_low = 0.2  # PPO clip: ratio >= 1 - clip_eps_low.
  c.loss.clip_eps_high = 0.2  # PPO clip-higher: ratio <= 1 + clip_eps_high.
  c.loss.clip_ratio_c = 3.0  # Dual-clip bound for negative advantages.
  c.loss.kl_loss_coef = 0.0  # Policy KL-to-reference coefficient (> 0 loads a reference model).
  c.loss.kl_type = "low_var_kl"  # "kl" (k1) | "mse" (k2) | "low_var_kl" (k3, clamped to [-10, 10]).
  c.loss.mask_truncated = False  # DAPO: drop truncated responses from the policy loss.
  c.loss.overlong_buffer_len = 0  # DAPO overlong shaping: penalty ramps over the last L tokens (0 = off).
  c.loss.overlong_penalty = 1.0  # DAPO overlong shaping: penalty at the length limit.

  # LaSeR: the last-token self-rewarding loss and advantage integration (names as in SPEC.md).
  c.laser = ml_collections.ConfigDict()
  c.laser.use_self_reward_loss = True  # False = plain GRPO baseline (no L_sr, no integration).
  # alpha: weight of the MSE self-rewarding loss L_sr (the paper: 0.1). The tiny run verifies best
  # with 0.5 (bench/learning.py sweep, README "Learning demonstration").
  c.laser.loss_coef = 0.5
  # beta_v: r_s = beta_v * (log pi(z_c | x, y) - c_ref) (the paper: 0.1 with c_ref -23). Both L_sr
  # targets must be reachable: beta_v * -c_ref >= 1.5 (config_check warns below it, calibrate
  # prints the range). 0.2 with c_ref -9 puts the correct class's target at log p(z_c) = -4.
  c.laser.kl_coef = 0.2
  # c_ref: the constant standing in for log pi_ref(z_c | x, y). -9.0 is what `laser_jax.calibrate`
  # measures on the tiny model after its warm start (Qwen2.5 models: -23.0, OctoThinker: -25.0).
  c.laser.ref_constant = -9.0
  c.laser.use_ref_model_score = False  # Exact variant: c_ref := log pi_ref(z_c | x, y) (loads pi_ref).
  c.laser.balanced = True  # Class-balance L_sr over finished correct/incorrect responses.
  c.laser.adv_integration_coef = 0.1  # tau: A' = (1 - tau) A + tau A^s after the warm-ups.
  c.laser.adv_filter_threshold = 0.1  # Use A^s only for groups whose score std exceeds this.
  c.laser.reasoning_warmup_steps = 0  # Steps of plain GRPO before L_sr starts.
  c.laser.self_rewarding_warmup_steps = 20  # Further steps of L_sr before advantage integration.
  c.laser.self_reward_token_id = -1  # z_c token id; -1 = the tokenizer's `self_reward_token`.
  c.laser.self_reward_token = "<|zc|>"  # z_c as a token string (used when the id is -1).

  # Supervised warm start on worked solutions before RL (synthetic task; 0 = off).
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 400  # Supervised steps run once at the start of a fresh run (brings accuracy to ~30%).
  c.sft.batch_size = 64  # Sequences per supervised step.
  c.sft.lr = 1e-3  # Supervised learning rate (constant, AdamW).

  c.eval = ml_collections.ConfigDict()
  c.eval.n = 2  # Samples per problem in the periodic evaluation.
  c.eval.temperature = 1.0  # Eval sampling temperature, 0 = greedy (the reference validates at 1.0).
  c.eval.max_new_tokens = 32  # Eval response length limit.

  # What the run records besides metrics.jsonl and TensorBoard scalars (README "Metrics, samples,
  # W&B and profiles").
  c.logging = ml_collections.ConfigDict()
  # Every this many RL steps, a table of sampled rollouts (problem, response, verifier reward, r_s,
  # finished) goes to workdir/samples.jsonl, TensorBoard text and W&B (0 = off; costs ~nothing:
  # the texts are the ones the verifier read).
  c.logging.samples_every = 25
  # Rows per table: the batch's first responses, i.e. one prompt's group (right and wrong side by side).
  c.logging.num_samples = 4
  # gs:// workdirs: object stores cannot append, so metrics.jsonl and samples.jsonl are rewritten
  # whole (and TensorBoard events copied) every this many steps, at every checkpoint and at exit;
  # a preemption loses only records after the last checkpoint, which the resumed run redoes.
  c.logging.remote_flush_every = 10

  c.profile = ml_collections.ConfigDict()
  # Consecutive RL steps to trace with jax.profiler into workdir/profile (TensorBoard's profile
  # tab, or Perfetto with the trace.json.gz), e.g. --config.profile.steps=5,6; () = off.
  c.profile.steps = ()

  # Weights & Biases, optional (pip install 'laser_jax[wandb]'): the scalars TensorBoard gets,
  # under the same names, and the samples table. A resumed run continues the same W&B run (its
  # id is kept in workdir/wandb_run_id).
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""  # W&B project; non-empty turns the sink on.
  c.wandb.entity = ""  # W&B user or team ("" = your default entity).
  c.wandb.name = ""  # Run display name ("" = W&B's generated name).
  c.wandb.mode = "online"  # "online" | "offline" (upload later with `wandb sync`) | "disabled".

  # `python -m laser_jax.aot` (README "Will it fit?"); the trainer ignores this section.
  c.aot = ml_collections.ConfigDict()
  # Response lengths of the expected step beside the worst case: "rlvr_long_tail" (log-normal, mean
  # a third of rollout.max_new_tokens, 5% truncated; laser_jax/aot/lengths.py), or a file: a JSON
  # list of observed lengths, or a run's metrics.jsonl (its mean length and truncated fraction).
  c.aot.response_lengths = "rlvr_long_tail"
  return c
