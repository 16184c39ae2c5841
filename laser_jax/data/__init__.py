"""Problems, prompts and rewards.

`records` (JSONL / parquet readers), `sources` (inputs by address: local, gs://, hub ids,
hf://datasets/...), `eval_sets` (where the five eval sets are found), `eval_fetch` and
`__main__` (`python -m laser_jax.data fetch`), `tfds_records` (the same records through
tensorflow-datasets), `prompts` (template and tokenization), `iterator` (resumable per-host
batches), `synthetic` (the embedded arithmetic task), `verifier` (rewards in a process pool) and
`answers` (the last boxed answer and its voting key). Imports only `laser_jax.config_check`.
"""
