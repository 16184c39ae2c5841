"""The GRPO + LaSeR objective as pure JAX functions over arrays (see ../shared/SPEC.md).

Nothing here knows about models: inputs are per-token log-probs [B, T], a response mask [B, T],
per-row rewards / group ids / finished flags [B], and the log-prob of the self-reward token z_c
after EOS, log pi(z_c | x, y) [B] (NaN allowed on truncated rows).

Exact micro-batching. Every loss returns a `SumCount`: the micro-batch's *sum* and *count*
(number of tokens for token-mean, number of sequences for the seq-mean modes, B for L_sr).
The trainer computes the global counts of the whole mini-batch once (`loss_normalisers`) and passes
them with the rows (`records.UpdateBatch`) to `total_loss`, so each micro-batch contributes sum / global_count: summing those over k
micro-batches (or data-parallel shards) gives exactly the full-batch loss *and* gradient, unlike a
mean of micro-batch means. Class-balancing weights of L_sr are likewise computed once over the whole
batch (`self_reward_class_weights`) and sliced per micro-batch.

The advantages themselves (GRPO's and LaSeR's self-rewarding ones, group ids) are in `advantages`;
`rollout_advantages` here combines them with the warm-up schedule for a whole rollout batch.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from laser_jax.rl import advantages as advantages_lib
from laser_jax.rl import dapo
from laser_jax.rl import records
from laser_jax.rl import rl_metrics
from laser_jax.rl.rl_metrics import SumCount

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("kl", "mse", "low_var_kl")
ADV_ESTIMATORS = ("grpo", "drgrpo")
# c_ref and beta_v of the paper's Qwen2.5 settings (SPEC): the one place their defaults live.
DEFAULT_REF_CONSTANT = -23.0
DEFAULT_KL_COEF = 0.1
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps rho finite even for wildly stale log-probs.
K3_CLAMP = 10.0


# --------------------------------------------------------------------------------------------
# LaSeR: the last-token self-rewarding score and its loss.
# --------------------------------------------------------------------------------------------


def self_reward_score(z_logprob: jax.Array, *, kl_coef: float = DEFAULT_KL_COEF,
                      ref_constant: float = DEFAULT_REF_CONSTANT,
                      ref_z_logprob: jax.Array | None = None) -> jax.Array:
  """r_s = beta_v * (log pi(z_c | x, y) - c_ref), with c_ref := log pi_ref(z_c | x, y) if given.

  `kl_coef` is beta_v (config.laser.kl_coef), `ref_constant` is c_ref. NaN in -> NaN out;
  the losses below mask truncated rows before any arithmetic.
  """
  ref = ref_constant if ref_z_logprob is None else ref_z_logprob
  return kl_coef * (z_logprob - ref)


def self_reward_class_weights(rewards: jax.Array, finished: jax.Array,
                              balanced: bool = True) -> jax.Array:
  """Per-row weights m_i * w_i of L_sr, computed over the WHOLE batch (slice per micro-batch).

  Over finished rows, N_+ verified-correct (r_v > 0.5) and N_- incorrect, N = N_+ + N_-:
  w = N / (2 N_+) on correct rows, N / (2 N_-) on incorrect ones, so each class carries total
  weight N / 2. Unbalanced: w = 1. Truncated rows get 0 (the m_i of the SPEC is folded in).
  """
  finished = jnp.asarray(finished, bool)
  m = finished.astype(jnp.float32)
  if not balanced:
    return m
  correct = jnp.asarray(rewards) > 0.5
  n_pos = jnp.sum(m * correct)
  n_neg = jnp.sum(m * ~correct)
  n = n_pos + n_neg
  w_pos = jnp.where(n_pos > 0, n / (2.0 * jnp.maximum(n_pos, 1.0)), 0.0)
  w_neg = jnp.where(n_neg > 0, n / (2.0 * jnp.maximum(n_neg, 1.0)), 0.0)
  return m * jnp.where(correct, w_pos, w_neg)


def self_reward_loss(z_logprob: jax.Array, rewards: jax.Array, finished: jax.Array,
                     weights: jax.Array, *, kl_coef: float = DEFAULT_KL_COEF,
                     ref_constant: float = DEFAULT_REF_CONSTANT,
                     ref_z_logprob: jax.Array | None = None) -> SumCount:
  """L_sr = mean over all B rows of m_i w_i (r_s_i - r_v_i)^2, as SumCount(sum, count = B).

  z_logprob [B] carries gradient (current parameters); NaN on truncated rows is replaced before
  any arithmetic, so neither the value nor the gradient is poisoned. `weights` come from
  `self_reward_class_weights` over the whole batch.
  """
  finished = jnp.asarray(finished, bool)
  lp = jnp.where(finished, z_logprob, ref_constant)
  ref = None if ref_z_logprob is None else jnp.where(finished, ref_z_logprob, ref_constant)
  score = self_reward_score(lp, kl_coef=kl_coef, ref_constant=ref_constant, ref_z_logprob=ref)
  err = score - jnp.asarray(rewards, jnp.float32)
  per_row = jnp.where(finished, weights * err * err, 0.0)
  return SumCount(jnp.sum(per_row), jnp.asarray(per_row.shape[0], jnp.float32))


def warmup_flags(step, reasoning_warmup_steps, self_rewarding_warmup_steps):
  """(self_reward_loss_on, adv_integration_on) at RL step `step`.

  step <= R: plain GRPO; R < step: L_sr on; step > R + S: advantage integration on too.
  Works on Python ints (returns bools) and on jnp scalars (returns jnp bools) alike.
  """
  loss_on = step > reasoning_warmup_steps
  integration_on = step > reasoning_warmup_steps + self_rewarding_warmup_steps
  return loss_on, integration_on


# --------------------------------------------------------------------------------------------
# Policy loss, KL and aggregation.
# --------------------------------------------------------------------------------------------


def _check_agg_mode(agg_mode: str, max_response_length):
  if agg_mode not in AGG_MODES:
    raise ValueError(f"loss agg_mode: expected one of {AGG_MODES}, got {agg_mode!r}")
  if agg_mode == "seq-mean-token-sum-norm" and not max_response_length:
    raise ValueError("agg_mode 'seq-mean-token-sum-norm' (Dr. GRPO) needs max_response_length > 0")


def aggregation_count(response_mask: jax.Array, agg_mode: str,
                      max_response_length: int | None = None) -> jax.Array:
  """The normaliser of `aggregate` for this (micro-)batch; sum it over pieces for the global one.

  token-mean: #response tokens. seq-mean-*: #sequences with >= 1 response token.
  seq-mean-token-sum-norm (Dr. GRPO): #sequences * max_response_length (a constant per sequence).
  """
  _check_agg_mode(agg_mode, max_response_length)
  mask = jnp.asarray(response_mask, jnp.float32)
  if agg_mode == "token-mean":
    return jnp.sum(mask)
  n_seq = jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))
  if agg_mode == "seq-mean-token-sum-norm":
    return dapo.drgrpo_normaliser(n_seq, max_response_length)
  return n_seq


def aggregate(token_values: jax.Array, response_mask: jax.Array, agg_mode: str,
              max_response_length: int | None = None) -> SumCount:
  """Aggregates per-token values [B, T] into SumCount(sum, count) for `agg_mode`.

  token-mean: sum_t,i v m / sum m.  seq-mean-token-sum: mean_i sum_t v m.
  seq-mean-token-mean: mean_i (sum_t v m / sum_t m).  seq-mean-token-sum-norm: Dr. GRPO's
  sum_t,i v m / (#seq * max_response_length). The seq-mean modes average over rows that have at
  least one response token. Masked entries of `token_values` may be NaN.
  """
  _check_agg_mode(agg_mode, max_response_length)
  mask = jnp.asarray(response_mask, jnp.float32)
  if token_values.shape != mask.shape:
    raise ValueError(f"aggregate: token values {token_values.shape} vs response_mask {mask.shape}")
  v = jnp.where(mask > 0, token_values, 0.0) * mask
  count = aggregation_count(mask, agg_mode, max_response_length)
  if agg_mode == "seq-mean-token-mean":
    n_tok = jnp.sum(mask, axis=-1)
    per_seq = jnp.sum(v, axis=-1) / jnp.maximum(n_tok, 1.0)
    return SumCount(jnp.sum(per_seq), count)
  return SumCount(jnp.sum(v), count)


def masked_log_ratio(logp: jax.Array, old_logp: jax.Array, response_mask: jax.Array) -> jax.Array:
  """logp - old_logp clamped to [-20, 20] on response tokens, 0 elsewhere (so exp is stable)."""
  mask = jnp.asarray(response_mask, bool)
  diff = jnp.where(mask, logp, 0.0) - jnp.where(mask, old_logp, 0.0)
  return jnp.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def policy_token_losses(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                        response_mask: jax.Array, *, clip_eps_low: float = 0.2,
                        clip_eps_high: float = 0.2,
                        clip_ratio_c: float | None = 3.0) -> jax.Array:
  """Per-token clipped-surrogate loss [B, T] (0 off-mask).

  rho = exp(clamp(logp - old_logp, -20, 20)); loss = max(-A rho, -A clip(rho, 1-eps_low,
  1+eps_high)); for A < 0 additionally min(loss, -A * clip_ratio_c) (dual clip; None = off).
  """
  if clip_ratio_c is not None and clip_ratio_c <= 1.0:
    raise ValueError(f"clip_ratio_c must be > 1 (or None to disable dual clip), got {clip_ratio_c}")
  mask = jnp.asarray(response_mask, jnp.float32)
  adv = advantages_lib.token_advantages(advantages, mask)
  ratio = jnp.exp(masked_log_ratio(logp, old_logp, mask))
  loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
  if clip_ratio_c is not None:
    loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * clip_ratio_c), loss)
  return loss * mask


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                response_mask: jax.Array, *, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
                clip_ratio_c: float | None = 3.0, agg_mode: str = "token-mean",
                max_response_length: int | None = None) -> tuple[SumCount, dict]:
  """Aggregated clipped-surrogate loss and its token metrics (clip fractions, approx KL).

  Returns (SumCount, {"actor/pg_clipfrac", "actor/pg_clipfrac_eps_high", "actor/pg_clipfrac_eps_low",
  "actor/pg_clipfrac_lower", "actor/approx_kl"}: SumCount; `rl_metrics.clip_fractions`).
  """
  mask = jnp.asarray(response_mask, jnp.float32)
  token_loss = policy_token_losses(logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low,
                                   clip_eps_high=clip_eps_high, clip_ratio_c=clip_ratio_c)
  loss = aggregate(token_loss, mask, agg_mode, max_response_length)
  log_ratio = jax.lax.stop_gradient(masked_log_ratio(logp, old_logp, mask))
  metrics = rl_metrics.clip_fractions(log_ratio, advantages_lib.token_advantages(advantages, mask), mask,
                                      clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                                      clip_ratio_c=clip_ratio_c)
  metrics["actor/approx_kl"] = rl_metrics.approx_kl(log_ratio, mask)
  return loss, metrics


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kl_type: str) -> jax.Array:
  """Per-token KL(pi || pi_ref) estimate, in verl's conventions.

  "kl" (k1): logp - ref;  "mse" (k2): 0.5 (logp - ref)^2;
  "low_var_kl" (k3): exp(ref - logp) - (ref - logp) - 1, with ref - logp clamped to [-20, 20]
  for a finite exp and the result clamped to [-10, 10].
  """
  if kl_type == "kl":
    return logp - ref_logp
  if kl_type == "mse":
    return 0.5 * jnp.square(logp - ref_logp)
  if kl_type == "low_var_kl":
    d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d) - d - 1.0, -K3_CLAMP, K3_CLAMP)
  raise ValueError(f"kl_type: expected one of {KL_TYPES}, got {kl_type!r}")


def kl_loss(logp: jax.Array, ref_logp: jax.Array, response_mask: jax.Array, *,
            kl_type: str = "low_var_kl", agg_mode: str = "token-mean",
            max_response_length: int | None = None) -> SumCount:
  """KL-to-reference loss aggregated like the policy loss; padding may hold NaN."""
  mask = jnp.asarray(response_mask, bool)
  kl = kl_penalty(jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0), kl_type)
  return aggregate(kl, mask, agg_mode, max_response_length)


# --------------------------------------------------------------------------------------------
# The combiners the trainer calls.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The scalars of the objective (names as in default_config.py: `loss.*` and `laser.*`)."""
  adv_estimator: str = "grpo"  # "grpo" | "drgrpo" (no std division).
  agg_mode: str = "token-mean"
  max_response_length: int | None = None  # Needed by agg_mode "seq-mean-token-sum-norm".
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  clip_ratio_c: float | None = 3.0
  kl_loss_coef: float = 0.0  # Policy KL-to-reference coefficient (NOT laser.kl_coef).
  kl_type: str = "low_var_kl"
  use_self_reward_loss: bool = True
  loss_coef: float = 0.1  # alpha.
  kl_coef: float = 0.1  # beta_v of the score r_s.
  ref_constant: float = DEFAULT_REF_CONSTANT  # c_ref.
  balanced: bool = True
  adv_integration_coef: float = 0.1  # tau.
  adv_filter_threshold: float = 0.1
  reasoning_warmup_steps: int = 0
  self_rewarding_warmup_steps: int = 0
  # DAPO: overlong reward shaping (0 = off) and dropping truncated rows from the loss.
  overlong_buffer_len: int = 0
  overlong_penalty: float = 1.0
  mask_truncated: bool = False

  def __post_init__(self):
    if self.adv_estimator not in ADV_ESTIMATORS:
      raise ValueError(f"loss.adv_estimator: expected one of {ADV_ESTIMATORS}, "
                       f"got {self.adv_estimator!r}")
    _check_agg_mode(self.agg_mode, self.max_response_length)
    if self.kl_type not in KL_TYPES:
      raise ValueError(f"loss.kl_type: expected one of {KL_TYPES}, got {self.kl_type!r}")
    if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
      raise ValueError(f"loss.clip_ratio_c must be > 1, got {self.clip_ratio_c}")

  @classmethod
  def from_config(cls, config: Any) -> "LossConfig":
    """Builds from a full training ConfigDict (reads `config.loss.*`, `config.laser.*`)."""
    loss, laser = config.loss, config.laser
    max_len = config.rollout.max_new_tokens if "rollout" in config else None
    return cls(
        adv_estimator=loss.adv_estimator, agg_mode=loss.agg_mode, max_response_length=max_len,
        clip_eps_low=loss.clip_eps_low, clip_eps_high=loss.clip_eps_high,
        clip_ratio_c=loss.clip_ratio_c, kl_loss_coef=loss.kl_loss_coef, kl_type=loss.kl_type,
        use_self_reward_loss=laser.use_self_reward_loss,
        loss_coef=laser.loss_coef,
        kl_coef=laser.kl_coef, ref_constant=laser.ref_constant, balanced=laser.balanced,
        adv_integration_coef=laser.adv_integration_coef,
        adv_filter_threshold=laser.adv_filter_threshold,
        reasoning_warmup_steps=laser.reasoning_warmup_steps,
        self_rewarding_warmup_steps=laser.self_rewarding_warmup_steps,
        overlong_buffer_len=loss.overlong_buffer_len, overlong_penalty=loss.overlong_penalty,
        mask_truncated=loss.mask_truncated)


def rollout_advantages(cfg: LossConfig, step, *, rewards: jax.Array, group_ids: jax.Array,
                       finished: jax.Array, scores: jax.Array | None = None,
                       num_groups: int | None = None) -> tuple[jax.Array, dict]:
  """Per-row advantages [B] for a whole rollout batch, with LaSeR integration when it is on.

  scores: the rollout's self-reward scores r_s (`self_reward_score`, against c_ref or pi_ref;
  NaN allowed on truncated rows, which score 0 here).
  Integration is applied when cfg.use_self_reward_loss, scores are given and the warm-up
  schedule says so at `step` (Python int or traced scalar).
  Returns (A' [B], metrics of scalars: "advantage/verifier_abs_mean" (|A|, from the verifier
  rewards), "advantage/abs_mean" (|A'|, what the update uses: after the integration when it is
  on), and with LaSeR on "advantage/self_differs_frac" (rows where A^s != A) and
  "advantage/integration_on").
  """
  adv = advantages_lib.grpo_advantages(rewards, group_ids, num_groups=num_groups,
                        norm_by_std=cfg.adv_estimator == "grpo")
  metrics = {"advantage/verifier_abs_mean": jnp.mean(jnp.abs(adv))}
  if not cfg.use_self_reward_loss or scores is None:
    metrics["advantage/abs_mean"] = metrics["advantage/verifier_abs_mean"]
    return adv, metrics
  _, integration_on = warmup_flags(step, cfg.reasoning_warmup_steps,
                                   cfg.self_rewarding_warmup_steps)
  finished = jnp.asarray(finished, bool)
  scores = jnp.where(finished, jnp.asarray(scores, jnp.float32), 0.0)
  adv_s = advantages_lib.self_rewarding_advantages(scores, finished, group_ids, adv,
                                    threshold=cfg.adv_filter_threshold, num_groups=num_groups)
  mixed = advantages_lib.integrate_advantages(adv, adv_s, cfg.adv_integration_coef)
  metrics["advantage/self_differs_frac"] = jnp.mean((adv_s != adv).astype(jnp.float32))
  metrics["advantage/integration_on"] = jnp.asarray(integration_on, jnp.float32)
  used = jnp.where(integration_on, mixed, adv)
  metrics["advantage/abs_mean"] = jnp.mean(jnp.abs(used))
  return used, metrics


@flax.struct.dataclass
class LossNormalisers:
  """Global counts of one optimizer update's whole mini-batch (all micro-batches, all hosts)."""
  policy: Any  # tokens (token-mean), sequences (seq-mean-*) or #seq * max_len (Dr. GRPO); KL too
  self_reward: Any  # rows: the self-reward loss is a mean over the mini-batch's rows


def loss_normalisers(cfg: LossConfig, response_mask: jax.Array) -> LossNormalisers:
  """The normalisers of a mini-batch from its whole response mask [B, T].

  Compute once on the full mini-batch mask (before splitting into micro-batches) and pass to
  every `total_loss` call; the KL loss shares the policy normaliser (same aggregation).
  """
  mask = jnp.asarray(response_mask, jnp.float32)
  return LossNormalisers(policy=aggregation_count(mask, cfg.agg_mode, cfg.max_response_length),
                         self_reward=jnp.asarray(mask.shape[0], jnp.float32))


def total_loss(cfg: LossConfig, batch: records.UpdateBatch, *, logp: jax.Array, z_logprob: jax.Array | None,
               normalisers: LossNormalisers | None = None, self_reward_active=True
               ) -> tuple[jax.Array, dict]:
  """L = L_GRPO + kl_loss_coef L_KL + alpha L_sr for one (micro-)batch, and its metrics.

  Args:
    cfg: the objective's scalars.
    batch: the rows (`records.UpdateBatch`, whose fields say what each holds); its
      self_reward_weights span the WHOLE mini-batch (None = computed here: right only when this
      call sees the whole mini-batch). Its `sequences` are not read: the forward is the caller's.
    logp: [B, T] current per-token log-probs (carry the gradient).
    z_logprob: [B] log pi_theta(z_c | x, y) from the same forward; None when L_sr is off.
    normalisers: `loss_normalisers(cfg, full_minibatch_mask)`. None = this call is the whole
      batch (local counts). With global normalisers, summing the returned loss over micro-batches
      gives exactly the full-batch loss and gradient.
    self_reward_active: the warm-up flag (Python or traced bool) from `warmup_flags`.

  Returns:
    (loss scalar, metrics {name: SumCount}); sum the metric dicts over micro-batches with
    rl_metrics.accumulate_metrics and divide once with rl_metrics.finalize_metrics.
  """
  response_mask, old_logp, advantages = batch.response_mask, batch.old_logp, batch.advantages
  ref_logp, rewards, finished = batch.ref_logp, batch.rewards, batch.finished
  self_reward_weights, ref_z_logprob = batch.self_reward_weights, batch.ref_z_logprob
  mask = jnp.asarray(response_mask, jnp.float32)
  local = loss_normalisers(cfg, mask)
  norm = local if normalisers is None else normalisers
  kw = dict(agg_mode=cfg.agg_mode, max_response_length=cfg.max_response_length)

  pg, metrics = policy_loss(logp, old_logp, advantages, mask, clip_eps_low=cfg.clip_eps_low,
                            clip_eps_high=cfg.clip_eps_high, clip_ratio_c=cfg.clip_ratio_c, **kw)
  loss = pg.sum / jnp.maximum(norm.policy, 1.0)
  metrics["actor/pg_loss"] = SumCount(pg.sum, pg.count)

  if cfg.kl_loss_coef:
    if ref_logp is None:
      raise ValueError("total_loss: kl_loss_coef > 0 needs ref_logp")
    kl = kl_loss(logp, ref_logp, mask, kl_type=cfg.kl_type, **kw)
    loss = loss + cfg.kl_loss_coef * kl.sum / jnp.maximum(norm.policy, 1.0)
    metrics["actor/kl_loss"] = kl

  if cfg.use_self_reward_loss:
    for name, x in (("z_logprob", z_logprob), ("rewards", rewards), ("finished", finished)):
      if x is None:
        raise ValueError(f"total_loss: laser.use_self_reward_loss needs {name}")
    weights = self_reward_weights
    if weights is None:
      weights = self_reward_class_weights(rewards, finished, cfg.balanced)
    sr = self_reward_loss(z_logprob, rewards, finished, weights, kl_coef=cfg.kl_coef,
                          ref_constant=cfg.ref_constant, ref_z_logprob=ref_z_logprob)
    active = jnp.asarray(self_reward_active, jnp.float32)
    loss = loss + active * cfg.loss_coef * sr.sum / jnp.maximum(norm.self_reward, 1.0)
    metrics["actor/self_reward_loss"] = sr
  return loss, metrics
