"""Evaluating a trained model: `evaluator` (sample, verify, score, report; `python -m
laser_jax.evaluate`), `loading` (an HF directory or a training checkpoint with its score's
constants), `report` (output records, summary, table), `tts` (test-time-scaling metrics),
`paper_table` (the paper's table over several eval sets; `configs/eval.py:paper`),
`calibrate` (c_ref and z_c checks; `python -m laser_jax.calibrate`) and `export` (a
self-describing HF directory; `python -m laser_jax.export`). Imports the packages below it.
"""
