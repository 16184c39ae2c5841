r"""Evaluation, c_ref calibration and export: sample n solutions per problem, verify, score, report.

Evaluate an export of a training run (laser_jax.export: its laser_jax.json holds z_c, beta_v, c_ref
and the prompt format; MATH500, 2 samples per problem, as in the paper):
  python -m laser_jax.evaluate --config=configs/eval.py \
      --config.model.hf_path=/path/to/Qwen2.5-7B-LaSeR --config.eval.input_file=math500 \
      --config.eval.output_file=/tmp/laser_jax/eval/math500.jsonl --config.eval.n=2
Evaluate any other Hugging Face model: its constants must be given (no defaults):
  python -m laser_jax.evaluate --config=configs/eval.py --config.model.hf_path=/path/to/model \
      --config.eval.input_file=math500 --config.laser.self_reward_token_id=151652 \
      --config.laser.kl_coef=0.1 --config.laser.ref_constant=-23.0
Evaluate a training run (latest checkpoint of its workdir; the run's config file rebuilds the model,
z_c, beta_v, c_ref and the prompt format):
  python -m laser_jax.evaluate --config=configs/eval.py \
      --config.model.checkpoint_dir=/tmp/laser_jax/tiny_cpu --config.model.train_config=configs/tiny_cpu.py \
      --config.eval.input_file=synthetic --config.eval.reward_fn=synthetic
Score with the exact variant (log pi_ref(z_c | x, y) of a reference model instead of c_ref):
  python -m laser_jax.evaluate --config=configs/eval.py --config.model.hf_path=/path/to/trained \
      --config.laser.ref_hf_path=/path/to/initial_model --config.eval.input_file=math500
Export a training run as a Hugging Face directory (for vLLM serving or the Hub; optionally uploaded):
  python -m laser_jax.export --config=configs/eval.py \
      --config.model.checkpoint_dir=/tmp/laser_jax/tiny_cpu --config.export.output_dir=/tmp/laser_jax/tiny_cpu_hf \
      --config.export.push_to_hub=your-org/tiny-laser
Measure c_ref for a new model and token (run it on the *initial* model, i.e. pi_ref; needs z_c only):
  python -m laser_jax.calibrate --config=configs/eval.py --config.model.hf_path=/path/to/model \
      --config.laser.self_reward_token_id=151652
The paper's table (MATH500, AIME24, AIME25, AMC23, OlympiadBench with the paper's n, temperature 1.0,
8192 new tokens, the base-model prompt): accuracy and self-verification F1 per set and on average,
one JSON (`table.output_dir`/table.json); a rerun resumes (a set already written is not redone):
  python -m laser_jax.evaluate --config=configs/eval.py:paper --config.model.hf_path=/path/to/model
"""
import ml_collections
from ml_collections import config_dict


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  """Every key the evaluator and the calibrator read, with its meaning; `preset` "paper"
  (`--config=configs/eval.py:paper`) sets the paper's evaluation protocol (`paper_protocol`)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # Hugging Face directory (config.json + safetensors + tokenizer).
  c.model.checkpoint_dir = ""  # Or a training workdir (or its checkpoints/ dir) written by laser_jax.train.
  c.model.checkpoint_step = -1  # Step to restore from checkpoint_dir; -1 = the latest.
  # The training config of checkpoint_dir: a configs/*.py file (get_config()) or a JSON dump of the
  # ConfigDict (config.to_json()); "" = <checkpoint_dir>/config.json if present. It rebuilds the model
  # shape, tokenizer and z_c exactly as the run had them.
  c.model.train_config = ""
  c.model.dtype = "float32"  # HF models: compute and parameter dtype, "float32" | "bfloat16".

  c.eval = ml_collections.ConfigDict()
  # A named set: math500, aime24, aime25, amc23, olympiadbench (found in eval.data_dir), "synthetic"
  # (the built-in task's held-out split), or JSONL/parquet files with `problem` and `answer` (a local
  # path or glob, a gs:// path or glob, or hf://datasets/ORG/NAME[@REV]/GLOB).
  c.eval.input_file = "math500"
  # Where named sets are (local or gs://; <dir>/<set>/test.jsonl, written by `python -m
  # laser_jax.data fetch --out=DIR`); "" = $LASER_JAX_DATA_DIR, else ~/.cache/laser_jax/eval_sets.
  c.eval.data_dir = ""
  c.eval.output_file = "/tmp/laser_jax/eval/output.jsonl"  # One JSON line per problem; summary beside it.
  c.eval.limit = 0  # Evaluate only the first `limit` problems (0 = all).
  c.eval.n = 2  # Samples per problem (paper: 2 for MATH500/OlympiadBench, 32 for AIME/AMC).
  c.eval.max_new_tokens = 8192  # Response length limit, EOS included; longer ones are truncated.
  c.eval.temperature = 1.0  # Sampling temperature (the self-reward score always uses T = 1).
  c.eval.top_p = 1.0  # Nucleus sampling threshold (1.0 = off).
  c.eval.top_k = 0  # Top-k sampling (0 = off).
  c.eval.greedy = False  # Argmax decoding (then n is usually 1).
  # At most this many decode loops (>= 64 tokens each), each attending only over the KV cache
  # written so far; each loop is compiled separately.
  c.eval.decode_segments = 4
  # Prompt format: "chat" (tokenizer's chat template) | "base" (plain text prompt) | "" = the one the
  # model was trained with (a checkpoint's data.template, an export's laser_jax.json; else "chat").
  c.eval.template = ""
  c.eval.max_prompt_len = 0  # Drop (and count) prompts longer than this many tokens (0 = keep all).
  # Prompts per sampler call (x n rows; the last batch is padded to this size), and the rows of each
  # extra scoring forward (pi_ref's for the exact score, truncated responses' with eval.score_truncated).
  c.eval.batch_size = 8
  c.eval.seed = 0  # Sampling seed: batch b uses fold_in(key(seed), b).
  c.eval.reward_fn = "math"  # "math" (math-verify on the last \boxed{}), "synthetic", or "pkg.module:fn".
  c.eval.num_workers = 4  # Verifier processes (0 = in-process, no time limit).
  c.eval.timeout_s = 10.0  # Wall-clock limit per verified answer; a timeout counts as wrong.
  c.eval.threshold = 0.5  # Self-verification: predict "correct" iff score > threshold.
  # Score truncated responses as the official evaluation does: EOS appended, log pi(z_c) read there
  # (one extra forward over each sampler call's truncated rows; records mark them
  # score_after_truncation). False: they have no score and self_verification/* counts them as
  # predicted "incorrect" (the *_finished figures leave them out either way).
  c.eval.score_truncated = True
  c.eval.num_bootstrap = 1000  # Resamples per problem for maj@k / self_weighted_maj@k / best@k.
  c.eval.bootstrap_seed = 0  # Seed of those resamples (fixed: reruns report identical numbers).

  # LaSeR score r_s = kl_coef * (log pi(z_c | x, y, EOS) - ref_constant). A checkpoint's constants
  # come from its training config, a laser_jax.export directory's from its laser_jax.json; a value
  # set here overrides them (the summary's overridden_constants lists it). Any other HF model needs
  # z_c, kl_coef and ref_constant set here: there are no defaults (calibrate needs z_c only).
  c.laser = ml_collections.ConfigDict()
  # z_c: an id (>= 0) wins over a token string (Qwen2.5: 151652 = "<|vision_start|>";
  # OctoThinker/Llama-3: 128002).
  c.laser.self_reward_token_id = -1
  c.laser.self_reward_token = ""
  c.laser.kl_coef = config_dict.placeholder(float)  # beta_v (the paper: 0.1).
  c.laser.ref_constant = config_dict.placeholder(float)  # c_ref (Qwen2.5: -23.0, OctoThinker: -25.0; see calibrate).
  # The exact score r_s = kl_coef * (log pi(z_c | x, y, EOS) - log pi_ref(z_c | x, y, EOS)): pi_ref's HF
  # directory (the evaluated model's architecture, usually its initial model). "" = ref_constant,
  # except for a model trained with the exact score: a checkpoint's own reference, an export's
  # recorded reference_model (set ref_constant instead to score with a constant).
  c.laser.ref_hf_path = ""

  # Device mesh (sizes multiply to the device count; -1 takes the rest). Batches shard over data x fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # laser_jax.calibrate: log pi_ref(z_c | x, y) statistics; sampling uses the eval.* keys above.
  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.num_problems = 64  # Problems sampled from eval.input_file (0 = all).
  c.calibrate.output_file = ""  # JSON report; "" = eval.output_file with suffix .calibration.json.
  # Warn when z_c gets more than this log-probability at any position inside sampled text
  # (log 0.01: the model would emit z_c in ordinary text about once per hundred tokens there).
  c.calibrate.warn_logprob = -4.6
  c.calibrate.scan_chunk = 256  # Sequence chunk for the vocabulary projection of the text scan.

  # laser_jax.export: write the model (usually a training checkpoint) as a Hugging Face directory
  # with its self-reward constants (laser_jax.json: z_c, beta_v, c_ref, prompt format) and a model
  # card (README.md) saying how to read the score. An HF model's constants come from the laser.*
  # keys above and must be set there.
  c.export = ml_collections.ConfigDict()
  c.export.output_dir = ""  # Target directory (config.json, safetensors, tokenizer, laser_jax.json).
  c.export.dtype = "bfloat16"  # Stored dtype: "bfloat16" (serving) | "float32".
  # Hub repo id ("org/name") to upload the directory to (huggingface_hub create_repo + upload_folder;
  # needs a token: `hf auth login` or $HF_TOKEN); "" = no upload.
  c.export.push_to_hub = ""
  c.export.hub_private = False  # Create the hub repo as private.

  # A table over several eval sets (laser_jax.evaluation.paper_table): `python -m laser_jax.evaluate`
  # with table.sets set evaluates each set (eval.* settings, its own n) into table.output_dir and
  # prints accuracy (mean@n: reward/mean) and self-verification F1 per set and their average, in
  # the paper's layout.
  c.table = ml_collections.ConfigDict()
  c.table.sets = ""  # Comma-separated eval-set names (in eval.data_dir); "" = one eval.input_file as usual.
  c.table.n = ()  # Samples per problem of each set, in table.sets' order (e.g. --config.table.n=2,32).
  # <set>.jsonl and its summary per set, and table.json (every figure, the per-set files). A set
  # whose output and summary are already there (with the same settings) is read back, not redone.
  c.table.output_dir = "/tmp/laser_jax/eval/table"
  if preset == "paper":
    paper_protocol(c)
  elif preset:
    raise ValueError(f"configs/eval.py: unknown preset {preset!r} (expected configs/eval.py:paper)")
  return c


def paper_protocol(c: ml_collections.ConfigDict) -> None:
  """The paper's evaluation (SPEC "Test time"): the five sets with their n, temperature 1.0, at most
  8192 new tokens, and the base-model prompt -- the problem + "\\nPlease reason step by step, ..."
  in the model's chat template, which is this package's "chat" template."""
  c.table.sets = "math500,aime24,aime25,amc23,olympiadbench"
  c.table.n = (2, 32, 32, 32, 2)
  c.eval.temperature = 1.0
  c.eval.max_new_tokens = 8192
  c.eval.template = "chat"
