"""Will it fit? `python -m laser_jax.aot` compiles the trainer's own programs for a TPU slice on any
machine: `topology` (chips and slices), `cost_model` (loop-aware FLOP, HBM and collective counts),
`program_report` (one compiled program: memory, counted costs, roofline time), `report`
(compile every program of one RL step, estimate the step), `lengths` (the response
lengths of a real step), `estimate` (that step from the worst-case programs) and `__main__` (the command).
"""
