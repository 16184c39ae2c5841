"""Small helpers shared by the notebooks: smoke mode, sampled-and-scored solutions, plots.

The notebooks stay readable by keeping the plumbing here:
- `smoke_mode()`: the tests run every notebook with LASER_JAX_SMOKE=1 (tiny local model, no network).
- `device_numerics()`: the compute dtype and attention kernel the device supports (Colab T4 vs A100).
- `sample_solutions(...)`: n responses per problem with their verifier reward, extracted answer,
  mean token log-likelihood and last-token self-reward score
  r_s = beta_v * (log pi(z_c | x, y) - c_ref), as [P, n] arrays that `laser_jax.evaluation.tts`
  consumes directly.
- `restore_params(trainer, workdir)`: the parameters of a finished `trainer.train` run.
- `metric_series` / `plot_training`: reward and self-verification F1 over RL steps.
- `scaling_curves` / `plot_scaling`: maj@k, self-reward-weighted maj@k and best@k against k.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from laser_jax.data import answers
from laser_jax.evaluation import report
from laser_jax.generate import sampler
from laser_jax.generate import sampling as sampling_lib
from laser_jax.models import model as model_lib
from laser_jax.models.config import resolve_attention, resolve_dtype
from laser_jax.rl import scoring
from laser_jax.training import checkpoint

SMOKE_ENV = "LASER_JAX_SMOKE"
SCALING_METHODS = ("maj", "self_weighted_maj", "best")
METHOD_LABELS = {"maj": "majority vote", "self_weighted_maj": "self-reward-weighted vote",
                 "best": "best-of-k by self-reward"}


def smoke_mode() -> bool:
  """True when the notebook runs as a test ($LASER_JAX_SMOKE=1): tiny local model, no network."""
  return os.environ.get(SMOKE_ENV) == "1"


def device_numerics(device=None) -> dict[str, str]:
  """The compute dtype and attention that "auto" picks on `device` (default: this process's first
  device; see `laser_jax.models.config.resolve_dtype`): bfloat16 + cuDNN flash attention on A100 /
  L4 / H100, bfloat16 + splash on TPU, float32 + chunked on a T4 (no bf16, no cuDNN flash) and on CPU --
  what configs/colab_small.py (model.dtype = model.attention = "auto") trains with there."""
  device = device if device is not None else jax.devices()[0]
  dtype = resolve_dtype("auto", device)
  return {"device": getattr(device, "device_kind", str(device)), "dtype": dtype,
          "attention": resolve_attention("auto", device, dtype)}


# ---- sampled solutions ---------------------------------------------------------------------------


def canonical_answer(text: str) -> str | None:
  """The voting key of a response: its last \\boxed{} content, canonicalised as the evaluator does
  (`answers.canonical_answer`); None if there is none.

  Votes pool responses whose canonical answers are equal strings, so `1 / 2` and `1/2` vote
  together; `0.5` and `\\frac{1}{2}` still vote apart (voting never calls the verifier).
  """
  return answers.canonical_answer(answers.extract_last_boxed(text))


@dataclasses.dataclass
class Solutions:
  """n sampled responses for each of P problems; arrays are [P, n]."""
  problems: list[str]
  references: list[str]
  texts: list[list[str]]
  answers: list[list[str | None]]  # canonical_answer of each response
  acc: np.ndarray  # float [P, n] verifier reward (0/1)
  scores: np.ndarray  # float [P, n] r_s; NaN for truncated responses (no EOS, no score)
  finished: np.ndarray  # bool [P, n]
  z_logprob: np.ndarray  # float [P, n] log pi(z_c | x, y, EOS) (T = 1); NaN if truncated
  prompt_ids: list[list[int]]  # [P] the prompt token ids
  response_ids: list[list[list[int]]]  # [P][n] generated ids, EOS excluded
  eos_token: np.ndarray  # int [P, n] the EOS id each finished response emitted
  likelihoods: np.ndarray  # float [P, n] the policy's mean token log-likelihood (report.mean_token_logprobs)

  @property
  def num_problems(self) -> int:
    return len(self.problems)

  @property
  def n(self) -> int:
    return self.acc.shape[1]


def sample_solutions(params, model_cfg, tokenizer, prompts: Sequence[Any], sampling, verifier,
                     rng, *, kl_coef: float, ref_constant: float, mesh=None,
                     problems_per_call: int = 0) -> Solutions:
  """Samples `sampling.n` responses per prompt, verifies them and reads their self-reward scores.

  `prompts` are `laser_jax.training.tasks.Prompt`s (token_ids, answer, problem); `verifier` is a
  `laser_jax.data.verifier.Verifier`; `kl_coef` is beta_v and `ref_constant` is c_ref. The scores
  come from the sampler itself (read in the decode step after each EOS; no second forward).
  `problems_per_call` > 0 samples that many problems per sampler call (bounds KV-cache memory),
  call i with key fold_in(rng, i) (`rl.scoring.generate`, the trainer's and evaluator's pipeline).
  """
  if sampling.self_reward_token_id is None:
    raise ValueError("sample_solutions: sampling.self_reward_token_id is None; the self-reward "
                     "score needs z_c (set it to the model's z_c token id)")
  if not prompts:
    raise ValueError("sample_solutions: prompts is empty")
  call = lambda token_ids, key: sampler.sample(params, model_cfg, token_ids, sampling, key, mesh=mesh)
  scored = scoring.generate_all(call, prompts, rng, prompts_per_call=problems_per_call,
                                decode=functools.partial(sampling_lib.decode_responses, tokenizer),
                                verifier=verifier, score=scoring.Score(kl_coef, ref_constant))
  out, texts = scored.sample, scored.texts
  tokens, lengths = out.tokens, out.lengths
  rewards, z_logprob, scores = scored.rewards.astype(np.float64), scored.z_logprob, scored.scores
  num, n = len(prompts), sampling.n
  rows = lambda xs: [list(xs[i * n:(i + 1) * n]) for i in range(num)]
  return Solutions(
      problems=[p.problem for p in prompts], references=[p.answer for p in prompts],
      texts=rows(texts), answers=rows([canonical_answer(t) for t in texts]),
      acc=rewards.reshape(num, n), scores=scores.reshape(num, n),
      finished=scored.finished.reshape(num, n), z_logprob=z_logprob.reshape(num, n),
      prompt_ids=[list(p.token_ids) for p in prompts],
      response_ids=rows([row[:k].tolist() for row, k in zip(tokens, lengths)]),
      eos_token=out.eos_token.reshape(num, n), likelihoods=report.mean_token_logprobs(out).reshape(num, n))


def full_forward_z_logprob(params, model_cfg, prompt_ids: Sequence[int],
                           response_ids: Sequence[int], eos_id: int, zc_id: int) -> float:
  """log pi(z_c | x, y, EOS) from a separate full forward pass over prompt + response + EOS.

  The sampler reads the same quantity during generation; this is the independent check.
  """
  ids = list(prompt_ids) + list(response_ids) + [int(eos_id)]
  tokens = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  logits = model_lib.forward(params, model_cfg, tokens, positions, jnp.ones_like(tokens, bool))
  return float(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32))[zc_id])


def restore_params(trainer, workdir: str, step: int | None = None):
  """Parameters of the checkpoint at `step` (default: the latest) of the run in `workdir`.

  `trainer` is a `laser_jax.training.trainer.Trainer` built from the run's config; the parameters come
  back placed in its shardings (`checkpoint.restore_params`: the optimizer state is not read).
  """
  state_dir, _ = checkpoint.step_directory(workdir, -1 if step is None else step)
  return checkpoint.restore_params(state_dir, trainer.abstract_state().params)


# ---- training curves -----------------------------------------------------------------------------


def metric_series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` over the records that carry it, in record order.

  metrics.jsonl stores NaN as null; it comes back as NaN so plots simply leave a gap.
  """
  steps, values = [], []
  for r in records:
    if key in r:
      steps.append(int(r["step"]))
      values.append(np.nan if r[key] is None else float(r[key]))
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def plot_training(records: Sequence[dict],
                  keys: Sequence[str] = ("rollout/reward/mean", "self_verification/f1_finished", "self_verification/acc_finished"),
                  eval_keys: Sequence[str] = ("eval/reward/mean", "eval/self_verification/f1_finished")):
  """One panel per metric over RL steps (training rollouts, then periodic evaluations)."""
  import matplotlib.pyplot as plt
  keys = [k for k in list(keys) + list(eval_keys) if any(k in r for r in records)]
  if not keys:
    raise ValueError("plot_training: none of the requested metrics is in the records")
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    steps, values = metric_series(records, key)
    ax.plot(steps, values, marker="o")
    ax.set_title(key)
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


# ---- test-time scaling ---------------------------------------------------------------------------

_AT_K = re.compile(r"^(?P<method>.+)@(?P<k>\d+)$")


def scaling_curves(metrics: dict[str, float],
                   methods: Sequence[str] = SCALING_METHODS) -> tuple[list[int], dict[str, list[float]]]:
  """Splits `tts.scaling_metrics` output ("maj@4": ...) into ks and one curve per method.

  Raises ValueError if a method lacks a k that another method has.
  """
  found: dict[str, dict[int, float]] = {m: {} for m in methods}
  for key, value in metrics.items():
    m = _AT_K.match(key)
    if m and m["method"] in found:
      found[m["method"]][int(m["k"])] = float(value)
  ks = sorted(set().union(*(d.keys() for d in found.values())))
  for method, by_k in found.items():
    missing = [k for k in ks if k not in by_k]
    if missing:
      raise ValueError(f"scaling_curves: metrics has no {method}@k for k in {missing}")
  return ks, {method: [by_k[k] for k in ks] for method, by_k in found.items()}


def plot_scaling(metrics: dict[str, float], title: str = "", mean_at_n: float | None = None):
  """Accuracy against k (log2 axis) for majority vote, weighted vote and best-of-k."""
  import matplotlib.pyplot as plt
  ks, curves = scaling_curves(metrics)
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for method, values in curves.items():
    ax.plot(ks, values, marker="o", label=METHOD_LABELS.get(method, method))
  if mean_at_n is not None:
    ax.axhline(mean_at_n, color="gray", ls="--", lw=1, label="mean accuracy (one sample)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks)
  ax.set_xticklabels([str(k) for k in ks])
  ax.set_xlabel("k (samples per problem)")
  ax.set_ylabel("accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig
