"""Sampling from a `models` decoder, with the LaSeR score read inside the decode loop.

`sampler` (jitted prefill + `lax.while_loop` decode over a donated state), `sampling`
(`SamplingParams` in, `SampleOutput` out), `draw` (one token per row from logits). Imports `models`.
"""
