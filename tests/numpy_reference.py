"""NumPy reference implementations of the objective, written straight from ../shared/SPEC.md.

Deliberately naive (Python loops over rows, groups and tokens, float64) so they are easy to check
against the SPEC by eye and share no code with laser_jax. Reusable by any test.
"""
import math

import numpy as np


def groups(group_ids):
  """{group id: [row indices]} in first-appearance order."""
  out = {}
  for i, g in enumerate(np.asarray(group_ids).tolist()):
    out.setdefault(g, []).append(i)
  return out


def unbiased_std(xs):
  xs = [float(x) for x in xs]
  if len(xs) < 2:
    return 0.0
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def grpo_advantages(rewards, group_ids, norm_by_std=True, eps=1e-6):
  """A_i = (r_i - mean_g) / (std_g + 1e-6), unbiased std; Dr. GRPO: r_i - mean_g. A group of one
  response: mean 0, std 1 (verl's compute_grpo_outcome_advantage)."""
  rewards = np.asarray(rewards, np.float64)
  adv = np.zeros(len(rewards))
  for rows in groups(group_ids).values():
    r = rewards[rows]
    m, s = (r.mean(), unbiased_std(r)) if len(rows) > 1 else (0.0, 1.0)
    for i in rows:
      adv[i] = (rewards[i] - m) / (s + eps) if norm_by_std else rewards[i] - m
  return adv


def score(z_logprob, beta_v=0.1, c_ref=-23.0, ref_z_logprob=None):
  ref = c_ref if ref_z_logprob is None else np.asarray(ref_z_logprob, np.float64)
  return beta_v * (np.asarray(z_logprob, np.float64) - ref)


def class_weights(rewards, finished, balanced=True):
  """m_i * w_i with w = N / (2 N_+) on correct, N / (2 N_-) on incorrect finished rows."""
  B = len(rewards)
  w = np.zeros(B)
  fin = [i for i in range(B) if finished[i]]
  if not balanced:
    for i in fin:
      w[i] = 1.0
    return w
  pos = [i for i in fin if rewards[i] == 1]
  neg = [i for i in fin if rewards[i] == 0]
  n = len(pos) + len(neg)
  for i in pos:
    w[i] = n / (2 * len(pos))
  for i in neg:
    w[i] = n / (2 * len(neg))
  return w


def self_reward_loss(z_logprob, rewards, finished, weights, beta_v=0.1, c_ref=-23.0,
                     ref_z_logprob=None):
  """L_sr = mean_i m_i w_i (r_s_i - r_v_i)^2 over all B rows."""
  total = 0.0
  for i in range(len(rewards)):
    if finished[i]:
      ref = c_ref if ref_z_logprob is None else ref_z_logprob[i]
      rs = beta_v * (float(z_logprob[i]) - float(ref))
      total += weights[i] * (rs - float(rewards[i])) ** 2
  return total / len(rewards)


def self_rewarding_advantages(scores, finished, group_ids, adv, threshold=0.1):
  out = np.zeros(len(adv))
  s = np.array([min(max(float(scores[i]), 0.0), 1.0) if finished[i] else 0.0
                for i in range(len(adv))])
  for rows in groups(group_ids).values():
    if len(rows) == 1:
      mu, sigma = 0.0, 1.0
    else:
      mu, sigma = s[rows].mean(), unbiased_std(s[rows])
    for i in rows:
      out[i] = (s[i] - mu) / sigma if sigma > threshold else adv[i]
  return out


def token_loss(logp, old_logp, adv, eps_low=0.2, eps_high=0.2, clip_c=3.0):
  """One token's clipped surrogate with dual clip."""
  rho = math.exp(logp - old_logp)
  loss = max(-adv * rho, -adv * min(max(rho, 1 - eps_low), 1 + eps_high))
  if clip_c is not None and adv < 0:
    loss = min(loss, -adv * clip_c)
  return loss


def aggregate(values, mask, mode, max_len=None):
  """values/mask [B, T] nested lists; the four aggregation modes."""
  B, T = len(mask), len(mask[0])
  if mode == "token-mean":
    s = sum(values[i][t] for i in range(B) for t in range(T) if mask[i][t])
    n = sum(1 for i in range(B) for t in range(T) if mask[i][t])
    return s / n if n else 0.0
  per_seq = []
  for i in range(B):
    toks = [values[i][t] for t in range(T) if mask[i][t]]
    if not toks:
      continue
    if mode == "seq-mean-token-sum":
      per_seq.append(sum(toks))
    elif mode == "seq-mean-token-mean":
      per_seq.append(sum(toks) / len(toks))
    elif mode == "seq-mean-token-sum-norm":
      per_seq.append(sum(toks) / max_len)
    else:
      raise ValueError(mode)
  return sum(per_seq) / len(per_seq) if per_seq else 0.0


def policy_loss(logp, old_logp, adv_rows, mask, mode="token-mean", eps_low=0.2, eps_high=0.2,
                clip_c=3.0, max_len=None):
  logp, old_logp, mask = np.asarray(logp), np.asarray(old_logp), np.asarray(mask)
  B, T = mask.shape
  vals = [[token_loss(logp[i, t], old_logp[i, t], adv_rows[i], eps_low, eps_high, clip_c)
           if mask[i, t] else 0.0 for t in range(T)] for i in range(B)]
  return aggregate(vals, mask.tolist(), mode, max_len)


def kl_token(logp, ref_logp, kl_type):
  if kl_type == "kl":
    return logp - ref_logp
  if kl_type == "mse":
    return 0.5 * (logp - ref_logp) ** 2
  d = ref_logp - logp
  return min(max(math.exp(d) - d - 1, -10.0), 10.0)


def self_verification(scores, rewards, finished, threshold=0.5):
  """(acc on correct, acc on incorrect, overall acc, F1, n_pos, n_neg) over finished rows."""
  pos_hits = pos = neg_hits = neg = 0
  for s, r, f in zip(scores, rewards, finished):
    if not f:
      continue
    if r == 1:
      pos += 1
      pos_hits += s > threshold
    else:
      neg += 1
      neg_hits += s <= threshold
  a = pos_hits / pos if pos else float("nan")
  b = neg_hits / neg if neg else float("nan")
  acc = (pos_hits + neg_hits) / (pos + neg) if pos + neg else float("nan")
  f1 = (2 * a * b / (a + b) if a + b > 0 else 0.0) if pos and neg else float("nan")
  return a, b, acc, f1, pos, neg


def self_verification_official(scores, rewards, threshold=0.5):
  """SPEC "Test time", the official evaluation's conventions: every response counts; a response
  without a score (None or NaN) counts as predicted "incorrect"; a class with no responses has
  accuracy 0; F1 (harmonic mean of the two class accuracies) is 0 when both are 0.
  Returns (acc on correct, acc on incorrect, overall acc, F1, n_pos, n_neg)."""
  pos_hits = pos = neg_hits = neg = 0
  for s, r in zip(scores, rewards):
    says_correct = s is not None and not math.isnan(s) and s > threshold
    if r > 0.5:
      pos += 1
      pos_hits += says_correct
    else:
      neg += 1
      neg_hits += not says_correct
  a = pos_hits / pos if pos else 0.0
  b = neg_hits / neg if neg else 0.0
  acc = (pos_hits + neg_hits) / (pos + neg) if pos + neg else 0.0
  f1 = 2 * a * b / (a + b) if a + b > 0 else 0.0
  return a, b, acc, f1, pos, neg


def auroc_unscored_lowest(scores, rewards):
  """AUROC over every response by counting (correct, incorrect) pairs: 1 when the correct one
  scores higher, 1/2 on a tie; a response without a score (NaN) scores below every score (ties
  with another unscored one). NaN when a class is empty."""
  key = lambda s: -math.inf if math.isnan(s) else s
  pos = [key(s) for s, r in zip(scores, rewards) if r > 0.5]
  neg = [key(s) for s, r in zip(scores, rewards) if r <= 0.5]
  if not pos or not neg:
    return float("nan")
  return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def ece_unscored_zero(scores, rewards, num_bins=10):
  """Expected calibration error of min(max(r_s, 0), 1) read as P(correct) over every response, a
  response without a score at P = 0: bins [b/10, (b+1)/10), the last one closed."""
  probs = [0.0 if math.isnan(s) else min(max(float(s), 0.0), 1.0) for s in scores]
  total = 0.0
  for b in range(num_bins):
    inside = [i for i, p in enumerate(probs) if min(int(p * num_bins), num_bins - 1) == b]
    if inside:
      accuracy = sum(rewards[i] > 0.5 for i in inside) / len(inside)
      confidence = sum(probs[i] for i in inside) / len(inside)
      total += len(inside) / len(probs) * abs(accuracy - confidence)
  return total if probs else float("nan")


def overlong_penalty(length, max_len, cache, factor=1.0):
  if length <= max_len - cache:
    return 0.0
  return -(length - (max_len - cache)) / cache * factor
