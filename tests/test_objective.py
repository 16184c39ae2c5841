"""Tests of laser_jax.rl.objective against NumPy references from SPEC.md and hand-worked cases."""
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from laser_jax.rl import advantages as advantages_lib
from laser_jax.rl import objective as obj
from laser_jax.rl import records
from laser_jax.rl import rl_metrics

SETTINGS = hypothesis.settings(max_examples=50, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
MODES = obj.AGG_MODES


def _random_batch(rng, B=12, T=7, num_groups=4):
  group_ids = rng.permutation(np.arange(B) % num_groups).astype(np.int32)  # Non-contiguous.
  lengths = rng.integers(1, T + 1, size=B)
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  return group_ids, mask


# --------------------------------------------------------------------------------------------
# Advantages.
# --------------------------------------------------------------------------------------------


def test_grpo_advantages_hand_worked():
  rewards = np.array([1, 1, 0, 1, 0.0, 1.0])
  group_ids = np.array([1, 0, 1, 0, 2, 3])
  adv = np.asarray(advantages_lib.grpo_advantages(rewards, group_ids))
  half_over_std = 0.5 / (math.sqrt(0.5) + 1e-6)  # group 1: rewards (1, 0), unbiased std sqrt(.5).
  # Groups 2 and 3 have one response each: mean 0, std 1 (verl), so A = r / (1 + 1e-6).
  np.testing.assert_allclose(adv, [half_over_std, 0, -half_over_std, 0, 0, 1 / (1 + 1e-6)], atol=1e-6)
  dr = np.asarray(advantages_lib.grpo_advantages(rewards, group_ids, norm_by_std=False))
  np.testing.assert_allclose(dr, [0.5, 0, -0.5, 0, 0, 1.0], atol=1e-7)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_advantages_match_reference(norm_by_std):
  rng = np.random.default_rng(0)
  for _ in range(5):
    group_ids, _ = _random_batch(rng, B=16, num_groups=5)
    rewards = rng.integers(0, 2, size=16).astype(np.float32) + rng.normal(size=16) * 0.1
    got = advantages_lib.grpo_advantages(rewards, group_ids, norm_by_std=norm_by_std)
    want = ref.grpo_advantages(rewards, group_ids, norm_by_std=norm_by_std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@SETTINGS
@hypothesis.given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.0, 0.5, -1.0])),
                           min_size=1, max_size=16),
                  st.booleans())
def test_advantages_sum_to_zero_per_group(rows, norm_by_std):
  group_ids = np.array([g for g, _ in rows], np.int32)
  rewards = np.array([r for _, r in rows], np.float32)
  adv = np.asarray(advantages_lib.grpo_advantages(rewards, group_ids, num_groups=4, norm_by_std=norm_by_std))
  for g in set(group_ids.tolist()):
    r = rewards[group_ids == g]
    if len(r) == 1:  # verl's convention for a group of one: mean 0, std 1.
      want = r[0] / (1 + 1e-6) if norm_by_std else r[0]
      assert adv[group_ids == g][0] == pytest.approx(want, abs=1e-6)
    elif not norm_by_std or ref.unbiased_std(r) > 0:
      assert abs(adv[group_ids == g].sum()) < 1e-4


def test_group_ids_out_of_range_is_a_clear_error():
  with pytest.raises(ValueError, match=r"group_ids: ids must lie in \[0, 3\)"):
    advantages_lib.grpo_advantages(np.zeros(3), np.array([0, 1, 7]))
  np.testing.assert_array_equal(advantages_lib.dense_group_ids(["b", "a", "b", "c"]), [1, 0, 1, 2])


def test_token_advantages_broadcast_and_shape_error():
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  np.testing.assert_array_equal(advantages_lib.token_advantages(np.array([2.0, -1.0]), mask),
                                [[2, 2, 0], [-1, 0, 0]])
  with pytest.raises(ValueError, match="advantages: expected"):
    advantages_lib.token_advantages(np.zeros(3), mask)


# --------------------------------------------------------------------------------------------
# LaSeR score, loss, weights, self-rewarding advantages, warm-up.
# --------------------------------------------------------------------------------------------


def test_self_reward_score_hand_worked():
  # 0.1 * (-18 - (-23)) = 0.5; exact variant: 0.1 * (-18 - (-20)) = 0.2.
  assert float(obj.self_reward_score(-18.0)) == pytest.approx(0.5)
  assert float(obj.self_reward_score(-18.0, ref_z_logprob=-20.0)) == pytest.approx(0.2)
  assert float(obj.self_reward_score(-25.0, kl_coef=0.2, ref_constant=-25.0)) == 0.0


def test_class_weights_hand_worked():
  # Finished: 3 correct, 1 incorrect -> N = 4: w+ = 4/6, w- = 4/2; truncated rows get 0.
  rewards = np.array([1, 1, 1, 0, 0, 1.0])
  finished = np.array([1, 1, 1, 1, 0, 0], bool)
  np.testing.assert_allclose(obj.self_reward_class_weights(rewards, finished),
                             [2 / 3, 2 / 3, 2 / 3, 2, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(obj.self_reward_class_weights(rewards, finished, False),
                                [1, 1, 1, 1, 0, 0])
  # One empty class: the other keeps weight N / (2 N) = 0.5; nothing finished: all 0.
  np.testing.assert_allclose(obj.self_reward_class_weights(np.ones(3), np.ones(3, bool)), [.5] * 3)
  np.testing.assert_array_equal(obj.self_reward_class_weights(np.ones(3), np.zeros(3, bool)), 0)


@SETTINGS
@hypothesis.given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=32))
def test_balanced_weights_give_equal_class_totals(rows):
  rewards = np.array([float(c) for c, _ in rows], np.float32)
  finished = np.array([f for _, f in rows])
  w = np.asarray(obj.self_reward_class_weights(rewards, finished))
  np.testing.assert_allclose(w, ref.class_weights(rewards, finished), rtol=1e-6)
  pos, neg = finished & (rewards == 1), finished & (rewards == 0)
  if pos.any() and neg.any():
    n = finished.sum()
    assert w[pos].sum() == pytest.approx(n / 2, rel=1e-5)
    assert w[neg].sum() == pytest.approx(n / 2, rel=1e-5)


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("exact", [True, False])
def test_self_reward_loss_matches_reference(balanced, exact):
  rng = np.random.default_rng(1)
  B = 10
  lp = rng.uniform(-30, -10, size=B).astype(np.float32)
  ref_lp = rng.uniform(-25, -20, size=B).astype(np.float32) if exact else None
  rewards = rng.integers(0, 2, size=B).astype(np.float32)
  finished = rng.random(B) < 0.7
  w = obj.self_reward_class_weights(rewards, finished, balanced)
  got = obj.self_reward_loss(lp, rewards, finished, w, ref_z_logprob=ref_lp)
  want = ref.self_reward_loss(lp, rewards, finished, ref.class_weights(rewards, finished, balanced),
                              ref_z_logprob=ref_lp)
  assert float(got.count) == B  # Mean over ALL B rows, per the SPEC.
  assert float(got.value) == pytest.approx(want, rel=1e-5)


def test_self_reward_loss_nan_on_truncated_rows_poisons_neither_value_nor_gradient():
  rewards = np.array([1.0, 0.0, 1.0])
  finished = np.array([True, False, True])
  w = obj.self_reward_class_weights(rewards, finished)

  def f(lp, ref_lp):
    return obj.self_reward_loss(lp, rewards, finished, w, ref_z_logprob=ref_lp).value

  lp = jnp.array([-15.0, jnp.nan, -20.0])
  ref_lp = jnp.array([-22.0, jnp.nan, -23.0])
  val, (g, g_ref) = jax.value_and_grad(f, argnums=(0, 1))(lp, ref_lp)
  assert np.isfinite(val) and np.all(np.isfinite(g)) and np.all(np.isfinite(g_ref))
  assert g[1] == 0.0
  # Row 0 correct: w = 2/(2*2) * ... N = 2, N+ = 2 -> w = 0.5; d/dlp (0.1(lp+22)-1)^2 * w / 3.
  assert float(g[0]) == pytest.approx(0.5 * 2 * (0.1 * 7 - 1) * 0.1 / 3, rel=1e-5)
  want = ref.self_reward_loss([-15, 0, -20], rewards, finished, [0.5, 0, 0.5],
                              ref_z_logprob=[-22, 0, -23])
  assert float(val) == pytest.approx(want, rel=1e-6)


def test_self_rewarding_advantages_hand_worked():
  # Group 0: scores clip to (1, 0, 0.5) -> mu .5, sigma .5 > .1 -> A^s = (1, -1, 0).
  # Group 1: (0.3, 0.3) -> sigma 0 -> fall back to A. Group 2 (size 1): (0.4 - 0) / 1.
  # Row 6 truncated (NaN score) -> s = 0 in group 3 with 0.05: sigma 0.035 -> fallback.
  scores = np.array([1.7, -0.2, 0.5, 0.3, 0.3, 0.4, np.nan, 0.05], np.float32)
  finished = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
  group_ids = np.array([0, 0, 0, 1, 1, 2, 3, 3])
  adv = np.arange(8, dtype=np.float32) * 0.1 - 0.3
  got = np.asarray(advantages_lib.self_rewarding_advantages(scores, finished, group_ids, adv))
  np.testing.assert_allclose(got, [1, -1, 0, adv[3], adv[4], 0.4, adv[6], adv[7]], atol=1e-6)
  np.testing.assert_allclose(got, ref.self_rewarding_advantages(scores, finished, group_ids, adv),
                             atol=1e-6)


def test_self_rewarding_advantages_random_vs_reference():
  rng = np.random.default_rng(2)
  for _ in range(5):
    group_ids, _ = _random_batch(rng, B=24, num_groups=6)
    scores = rng.uniform(-0.5, 1.5, size=24).astype(np.float32)
    finished = rng.random(24) < 0.8
    scores[~finished] = np.nan
    adv = rng.normal(size=24).astype(np.float32)
    got = advantages_lib.self_rewarding_advantages(scores, finished, group_ids, adv, threshold=0.2)
    want = ref.self_rewarding_advantages(scores, finished, group_ids, adv, threshold=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@SETTINGS
@hypothesis.given(st.lists(st.floats(-5, 5), min_size=1, max_size=16), st.data())
def test_integration_tau_zero_is_identity_and_tau_one_is_self(adv, data):
  adv = np.array(adv, np.float32)
  adv_s = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=len(adv), max_size=len(adv))),
                   np.float32)
  np.testing.assert_array_equal(advantages_lib.integrate_advantages(adv, adv_s, 0.0), adv)
  np.testing.assert_array_equal(advantages_lib.integrate_advantages(adv, adv_s, 1.0), adv_s)
  np.testing.assert_allclose(advantages_lib.integrate_advantages(adv, adv_s, 0.1), 0.9 * adv + 0.1 * adv_s,
                             rtol=1e-6, atol=1e-6)


def test_warmup_flags_python_and_jnp():
  expected = {0: (False, False), 200: (False, False), 201: (True, False), 400: (True, False),
              401: (True, True)}
  for step, want in expected.items():
    got = obj.warmup_flags(step, 200, 200)
    assert got == want and all(isinstance(x, bool) for x in got)
    traced = jax.jit(lambda s: obj.warmup_flags(s, 200, 200))(jnp.int32(step))
    assert tuple(bool(x) for x in traced) == want
  assert obj.warmup_flags(1, 0, 0) == (True, True)


def test_rollout_advantages_follow_warmup():
  cfg = obj.LossConfig(reasoning_warmup_steps=2, self_rewarding_warmup_steps=3,
                       adv_integration_coef=0.25)
  rng = np.random.default_rng(3)
  group_ids = np.repeat(np.arange(4), 4).astype(np.int32)
  rewards = rng.integers(0, 2, size=16).astype(np.float32)
  finished = rng.random(16) < 0.8
  lp = rng.uniform(-30, -10, size=16).astype(np.float32)
  lp[~finished] = np.nan
  a = ref.grpo_advantages(rewards, group_ids)
  for step in (0, 2, 5):
    got, _ = obj.rollout_advantages(cfg, step, rewards=rewards, group_ids=group_ids,
                                    finished=finished, scores=ref.score(lp))
    np.testing.assert_allclose(got, a, rtol=1e-5, atol=1e-5)
  got, metrics = obj.rollout_advantages(cfg, 6, rewards=rewards, group_ids=group_ids,
                                        finished=finished, scores=ref.score(lp))
  a_s = ref.self_rewarding_advantages(ref.score(lp), finished, group_ids, a)
  np.testing.assert_allclose(got, 0.75 * a + 0.25 * a_s, rtol=1e-5, atol=1e-5)
  assert float(metrics["advantage/integration_on"]) == 1.0
  # The logged advantages: |A| of the verifier's, |A'| of the integrated ones the update uses.
  assert float(metrics["advantage/verifier_abs_mean"]) == pytest.approx(np.abs(a).mean(), rel=1e-5)
  assert float(metrics["advantage/abs_mean"]) == pytest.approx(np.abs(0.75 * a + 0.25 * a_s).mean(), rel=1e-5)
  # Dr. GRPO estimator, LaSeR off.
  cfg_dr = obj.LossConfig(adv_estimator="drgrpo", use_self_reward_loss=False)
  got, metrics = obj.rollout_advantages(cfg_dr, 10, rewards=rewards, group_ids=group_ids,
                                        finished=finished, scores=ref.score(lp))
  np.testing.assert_allclose(got, ref.grpo_advantages(rewards, group_ids, False), atol=1e-6)
  assert float(metrics["advantage/abs_mean"]) == pytest.approx(np.abs(got).mean(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Policy loss, KL, aggregation.
# --------------------------------------------------------------------------------------------


def test_policy_token_loss_hand_worked():
  # A=1, rho=1.5 -> -1.2 (upper clip); A=-1, rho=5 -> max(5, 1.2)=5, dual clip -> 3;
  # A=-1, rho=0.5 -> max(0.5, 0.8) = 0.8 (lower clip); A=2, rho=1 -> -2.
  logp = np.log(np.array([[1.5], [5.0], [0.5], [1.0]], np.float32))
  old = np.zeros_like(logp)
  adv = np.array([1.0, -1.0, -1.0, 2.0])
  mask = np.ones_like(logp)
  got = obj.policy_token_losses(logp, old, adv, mask)
  np.testing.assert_allclose(got[:, 0], [-1.2, 3.0, 0.8, -2.0], rtol=1e-6)
  no_dual = obj.policy_token_losses(logp, old, adv, mask, clip_ratio_c=None)
  assert float(no_dual[1, 0]) == pytest.approx(5.0, rel=1e-6)
  _, metrics = obj.policy_loss(logp, old, adv, mask)
  assert float(metrics["actor/pg_clipfrac"].value) == 0.5  # rows 0 (eps_high) and 2 (eps_low)
  assert float(metrics["actor/pg_clipfrac_eps_high"].value) == 0.25
  assert float(metrics["actor/pg_clipfrac_eps_low"].value) == 0.25
  assert float(metrics["actor/pg_clipfrac_lower"].value) == 0.25  # row 1: the dual clip
  assert float(metrics["actor/approx_kl"].value) == pytest.approx(-np.log([1.5, 5, .5, 1]).mean(), 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_matches_reference_all_modes(mode):
  rng = np.random.default_rng(4)
  group_ids, mask = _random_batch(rng, B=8, T=6)
  logp = rng.uniform(-3, -0.1, size=mask.shape).astype(np.float32)
  old = logp + rng.normal(size=mask.shape).astype(np.float32) * 0.6  # All clip regions hit.
  adv = rng.normal(size=8).astype(np.float32)
  mask[3] = 0  # A row with no tokens must not count as a sequence.
  got, _ = obj.policy_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28,
                           agg_mode=mode, max_response_length=6)
  want = ref.policy_loss(logp.astype(np.float64), old.astype(np.float64), adv, mask, mode,
                         eps_high=0.28, max_len=6)
  assert float(got.value) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_policy_loss_gradient_matches_analytic():
  # d loss_t / d logp_t = -A rho when the unclipped branch is active, else 0 (token-mean).
  rng = np.random.default_rng(5)
  _, mask = _random_batch(rng, B=6, T=5)
  logp = rng.uniform(-2, -0.1, size=mask.shape)
  old = logp + rng.normal(size=mask.shape) * 0.5
  adv = rng.normal(size=6)
  g = jax.grad(lambda lp: obj.policy_loss(lp, old.astype(np.float32), adv, mask)[0].value)(
      jnp.asarray(logp, jnp.float32))
  want = np.zeros_like(logp)
  for i in range(6):
    for t in range(5):
      if not mask[i, t]:
        continue
      rho = math.exp(logp[i, t] - old[i, t])
      a = adv[i]
      unclipped = -a * rho
      clipped = -a * min(max(rho, 0.8), 1.2)
      active = unclipped >= clipped
      if a < 0 and max(unclipped, clipped) > -a * 3.0:
        active = False
      want[i, t] = -a * rho / mask.sum() if active else 0.0
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


_jit_policy_loss = jax.jit(lambda *a: obj.policy_loss(*a)[0].value)


@SETTINGS
@hypothesis.given(st.data())
def test_ratio_one_gives_minus_mean_advantage(data):
  B, T = 6, 5  # Fixed shape (one compile); lengths 0..T vary the mask, including empty rows.
  lengths = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
  hypothesis.assume(lengths.sum() > 0)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  adv = np.array(data.draw(st.lists(st.floats(-3, 3), min_size=B, max_size=B)), np.float32)
  logp = np.array(data.draw(st.lists(st.floats(-5, 0), min_size=B * T, max_size=B * T)),
                  np.float32).reshape(B, T)
  loss = _jit_policy_loss(logp, logp, adv, mask)
  want = -(adv[:, None] * mask).sum() / mask.sum()
  assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_log_ratio_is_stable_and_nan_padding_is_harmless():
  logp = np.array([[-0.1, -1.0, np.nan]], np.float32)
  old = np.array([[-150.0, -1.0, np.nan]], np.float32)  # ratio would overflow without the clamp.
  mask = np.array([[1, 1, 0]], np.float32)
  loss, _ = obj.policy_loss(logp, old, np.array([-1.0]), mask)
  g = jax.grad(lambda lp: obj.policy_loss(lp, old, np.array([-1.0]), mask)[0].value)(logp)
  # Token 0: dual clip -> 3; token 1: rho = 1 -> 1; token-mean = 2.
  assert float(loss.value) == pytest.approx(2.0, rel=1e-6)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("kl_type", obj.KL_TYPES)
def test_kl_penalty_matches_reference(kl_type):
  rng = np.random.default_rng(6)
  logp = rng.uniform(-6, 0, size=(4, 5))
  ref_lp = rng.uniform(-6, 0, size=(4, 5))
  got = np.asarray(obj.kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref_lp, jnp.float32),
                                  kl_type))
  want = np.vectorize(lambda a, b: ref.kl_token(a, b, kl_type))(logp, ref_lp)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The k3 clamp at 10 is actually reached (exp(6) - 6 - 1 > 10) in this draw.
  if kl_type == "low_var_kl":
    assert got.max() == pytest.approx(10.0) and got.min() >= 0.0


def test_kl_loss_aggregation_and_errors():
  logp = np.array([[-1.0, -2.0, np.nan]], np.float32)
  ref_lp = np.array([[-1.5, -1.0, np.nan]], np.float32)
  mask = np.array([[1, 1, 0]])
  got = obj.kl_loss(logp, ref_lp, mask, kl_type="kl")
  assert float(got.value) == pytest.approx((0.5 - 1.0) / 2)
  with pytest.raises(ValueError, match="kl_type: expected one of"):
    obj.kl_penalty(logp, ref_lp, "k4")
  with pytest.raises(ValueError, match="agg_mode: expected one of"):
    obj.aggregate(logp, mask, "token-sum")
  with pytest.raises(ValueError, match="needs max_response_length"):
    obj.aggregate(logp, mask, "seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
    obj.LossConfig(clip_ratio_c=0.5)


# --------------------------------------------------------------------------------------------
# Exact micro-batch accumulation through a tiny linear "model".
# --------------------------------------------------------------------------------------------


def _linear_model_batch(rng, B=10, T=6, D=4):
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  xz = rng.normal(size=(B, D)).astype(np.float32)
  lengths = np.array([1, 6, 2, 5, 3, 6, 1, 4, 2, 6])[:B]
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  data = dict(
      x=x, xz=xz, mask=mask,
      old_logp=(-rng.uniform(0.2, 2.0, size=(B, T))).astype(np.float32),
      ref_logp=(-rng.uniform(0.2, 2.0, size=(B, T))).astype(np.float32),
      adv=rng.normal(size=B).astype(np.float32),
      rewards=np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], np.float32)[:B],
      finished=np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)[:B])
  return data


def _batch(d, weights=None, **fields) -> records.UpdateBatch:
  """The rows of `d` as the update's record (no sequences: the "model" below gives log-probs)."""
  return records.UpdateBatch(sequences=None, response_mask=d["mask"], old_logp=d["old_logp"],
                             advantages=d["adv"], rewards=d["rewards"], finished=d["finished"],
                             self_reward_weights=weights, ref_logp=d.get("ref_logp"), **fields)


def _micro_loss(cfg, w, d, normalisers, weights):
  logp = -jax.nn.softplus(d["x"] @ w)  # A tiny "model": log-probs linear in the features.
  z_logprob = -15.0 - 10.0 * jax.nn.sigmoid(d["xz"] @ w)
  loss, _ = obj.total_loss(cfg, _batch(d, weights), logp=logp, z_logprob=z_logprob, normalisers=normalisers)
  return loss


# Jitted once per (config, micro-batch shape); hypothesis examples reuse the compiled functions.
_value_and_grad = jax.jit(jax.value_and_grad(_micro_loss, argnums=1), static_argnums=0)
_loss = jax.jit(_micro_loss, static_argnums=0)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_accumulation_equals_full_batch(mode):
  rng = np.random.default_rng(7)
  d = _linear_model_batch(rng)
  cfg = obj.LossConfig(agg_mode=mode, max_response_length=6, kl_loss_coef=0.05, kl_type="mse",
                       loss_coef=0.5)
  w = jnp.asarray(rng.normal(size=4), jnp.float32)
  full_loss, full_grad = _value_and_grad(cfg, w, d, None, None)

  normalisers = obj.loss_normalisers(cfg, d["mask"])
  weights = obj.self_reward_class_weights(d["rewards"], d["finished"], cfg.balanced)
  bounds = [0, 3, 4, 8, 10]  # Unequal micro-batches.
  loss_sum, grad_sum, naive = 0.0, 0.0, []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    piece = {k: v[lo:hi] for k, v in d.items()}
    l, g = _value_and_grad(cfg, w, piece, normalisers, weights[lo:hi])
    loss_sum, grad_sum = loss_sum + l, grad_sum + g
    naive.append(_loss(cfg, w, piece, None, None))  # Local counts and local weights.
  np.testing.assert_allclose(loss_sum, full_loss, rtol=1e-5)
  np.testing.assert_allclose(grad_sum, full_grad, rtol=1e-5, atol=1e-7)
  assert abs(float(np.mean(naive)) - float(full_loss)) > 1e-3 * abs(float(full_loss))


def _pad_rows(piece, size):
  """Pads a micro-batch to `size` rows with empty rows (mask 0, unfinished), as a trainer would."""
  pad = size - len(piece["adv"])
  return {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in piece.items()}


@SETTINGS
@hypothesis.given(st.sampled_from(MODES), st.lists(st.integers(1, 9), min_size=1, max_size=4,
                                                   unique=True))
def test_micro_batch_accumulation_any_split_with_padding(mode, cuts):
  rng = np.random.default_rng(8)
  d = _linear_model_batch(rng)
  cfg = obj.LossConfig(agg_mode=mode, max_response_length=6, kl_loss_coef=0.1, kl_type="kl")
  w = jnp.asarray(rng.normal(size=4), jnp.float32)
  full = _value_and_grad(cfg, w, d, None, None)
  normalisers = obj.loss_normalisers(cfg, d["mask"])
  weights = np.asarray(obj.self_reward_class_weights(d["rewards"], d["finished"]))
  bounds = [0] + sorted(cuts) + [10]
  pieces = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    piece = _pad_rows({k: v[lo:hi] for k, v in d.items()} | {"w": weights[lo:hi]}, 10)
    pieces.append(_value_and_grad(cfg, w, piece, normalisers, piece["w"]))
  np.testing.assert_allclose(sum(p[0] for p in pieces), full[0], rtol=1e-5)
  np.testing.assert_allclose(sum(p[1] for p in pieces), full[1], rtol=1e-5, atol=1e-7)


def test_micro_batch_metrics_accumulate_exactly():
  rng = np.random.default_rng(9)
  d = _linear_model_batch(rng)
  cfg = obj.LossConfig(kl_loss_coef=0.1)
  logp = -jax.nn.softplus(d["x"] @ jnp.ones(4))

  def metrics(sl):
    _, m = obj.total_loss(cfg, _batch({k: v[sl] for k, v in d.items()}), logp=logp[sl],
                          z_logprob=jnp.full(10, -20.0)[sl])
    return m

  full = rl_metrics.finalize_metrics(metrics(slice(0, 10)))
  acc = rl_metrics.finalize_metrics(rl_metrics.accumulate_metrics(
      [metrics(slice(0, 3)), metrics(slice(3, 10))]))
  # Every token-level metric matches exactly; L_sr differs only through its local weights here.
  for k in ("actor/pg_loss", "actor/kl_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_eps_high",
            "actor/pg_clipfrac_eps_low", "actor/pg_clipfrac_lower", "actor/approx_kl"):
    assert acc[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), k


# --------------------------------------------------------------------------------------------
# The combiner.
# --------------------------------------------------------------------------------------------


def test_total_loss_combines_terms_and_respects_warmup_flag():
  rng = np.random.default_rng(10)
  d = _linear_model_batch(rng)
  logp = np.asarray(-jax.nn.softplus(d["x"] @ jnp.ones(4)))
  lp = np.full(10, -18.0, np.float32)
  lp[~d["finished"]] = np.nan
  cfg = obj.LossConfig(kl_loss_coef=0.2, kl_type="kl", loss_coef=0.3, clip_eps_high=0.28)
  batch = _batch(d)
  kw = dict(logp=logp, z_logprob=lp)
  pg = ref.policy_loss(logp, d["old_logp"], d["adv"], d["mask"], eps_high=0.28)
  kl = ref.aggregate(np.vectorize(lambda a, b: ref.kl_token(a, b, "kl"))(logp, d["ref_logp"]),
                     d["mask"], "token-mean")
  sr = ref.self_reward_loss(lp, d["rewards"], d["finished"],
                            ref.class_weights(d["rewards"], d["finished"]))
  loss, metrics = obj.total_loss(cfg, batch, **kw)
  assert float(loss) == pytest.approx(pg + 0.2 * kl + 0.3 * sr, rel=1e-5)
  assert float(metrics["actor/self_reward_loss"].value) == pytest.approx(sr, rel=1e-5)
  step_fn = jax.jit(lambda s: obj.total_loss(cfg, batch, **kw, self_reward_active=obj.warmup_flags(
      s, 5, 5)[0])[0])
  assert float(step_fn(jnp.int32(3))) == pytest.approx(pg + 0.2 * kl, rel=1e-5)
  assert float(step_fn(jnp.int32(6))) == pytest.approx(pg + 0.2 * kl + 0.3 * sr, rel=1e-5)
  # Plain GRPO config needs no LaSeR inputs.
  plain = obj.LossConfig(use_self_reward_loss=False, clip_eps_high=0.28)
  loss, metrics = obj.total_loss(plain, records.UpdateBatch(
      sequences=None, response_mask=d["mask"], old_logp=d["old_logp"], advantages=d["adv"], rewards=None,
      finished=None, self_reward_weights=None), logp=logp, z_logprob=None)
  assert float(loss) == pytest.approx(pg, rel=1e-5) and "actor/self_reward_loss" not in metrics
  with pytest.raises(ValueError, match="needs z_logprob"):
    obj.total_loss(cfg, batch, logp=logp, z_logprob=None)


def test_loss_config_from_default_config():
  from laser_jax import default_config
  c = default_config.get_config()
  cfg = obj.LossConfig.from_config(c)
  assert cfg.loss_coef == c.laser.loss_coef and cfg.kl_coef == c.laser.kl_coef
  assert cfg.kl_loss_coef == c.loss.kl_loss_coef and cfg.ref_constant == c.laser.ref_constant
  assert cfg.max_response_length == c.rollout.max_new_tokens
  c.loss.agg_mode = "token-avg"
  with pytest.raises(ValueError, match="agg_mode: expected one of"):
    obj.LossConfig.from_config(c)


def test_data_parallel_shards_sum_to_full_batch():
  # Each of 2 data-parallel shards computes sum / GLOBAL count; the psum of the shard losses and
  # the gradient equal the single-device full-batch ones. (Inside shard_map, the gradient w.r.t.
  # the replicated `w` is already summed over the axis by JAX's transpose of the implicit pvary:
  # an explicit psum of it would double it.)
  from jax.sharding import Mesh, PartitionSpec as P
  rng = np.random.default_rng(11)
  d = _linear_model_batch(rng)
  d["w"] = np.asarray(obj.self_reward_class_weights(d["rewards"], d["finished"]))
  cfg = obj.LossConfig(agg_mode="seq-mean-token-mean", kl_loss_coef=0.1, kl_type="low_var_kl")
  w = jnp.asarray(rng.normal(size=4), jnp.float32)
  full = _value_and_grad(cfg, w, d, None, None)
  normalisers = obj.loss_normalisers(cfg, d["mask"])
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))

  def shard_fn(w, shard):
    l, g = jax.value_and_grad(_micro_loss, argnums=1)(cfg, w, shard, normalisers, shard["w"])
    return jax.lax.psum(l, "data"), g

  sharded = jax.jit(jax.shard_map(shard_fn, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=(P(), P())))
  loss, grad = sharded(w, d)
  np.testing.assert_allclose(loss, full[0], rtol=1e-5)
  np.testing.assert_allclose(grad, full[1], rtol=1e-5, atol=1e-7)
