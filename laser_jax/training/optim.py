"""The optax optimizer: AdamW with global-norm clipping and a constant or warmup+cosine schedule."""
import ml_collections
import optax


def make_schedule(optim: ml_collections.ConfigDict, total_updates: int) -> optax.Schedule:
  """Learning-rate schedule over optimizer updates (not RL steps: several per step are possible)."""
  if optim.schedule == "constant":
    return optax.constant_schedule(optim.lr)
  if optim.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
        decay_steps=max(total_updates, optim.warmup_steps + 1), end_value=0.0)
  raise ValueError(f"config.optim.schedule: expected 'constant' or 'warmup_cosine', got {optim.schedule!r}")


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) after optional global-norm clipping."""
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(make_schedule(optim, total_updates), b1=optim.b1, b2=optim.b2,
                           eps=optim.eps, weight_decay=optim.weight_decay))
  return optax.chain(*parts)
