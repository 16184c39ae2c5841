"""The RL loop and what a run keeps.

`trainer` (one RL step and the run loop), `programs` (the step's jitted programs and their
shardings, shared with `laser_jax.aot`), `tasks` (what a config trains: tokenizer, model config,
prompts, verifier, the initial policy and pi_ref), `sft` (the supervised warm start), `optim`,
`checkpoint` (orbax), `metrics_writer` (metrics.jsonl, samples, TensorBoard, W&B, profiles),
`dry_run` (`train --dry_run`). Imports `rl`, `generate`, `models` and `data`.
"""
