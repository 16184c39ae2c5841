"""The RL algorithm as functions of arrays: from sampled responses to the loss.

`scoring` (decode -> verify -> self-reward score r_s of sampled rows), `rollout` (the training
batch layout of sampled rows), `policy` (training-time log-probs from the model), `advantages`
(GRPO and LaSeR's self-rewarding advantages), `objective` (the SPEC's losses and their combiners),
`dapo` (DAPO options), `rl_metrics` (metrics of a step, self-verification's one implementation).
Imports `generate` and `models`.
"""
