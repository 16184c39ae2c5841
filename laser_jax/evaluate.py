r"""`python -m laser_jax.evaluate`: sample, verify and score n solutions per problem, and report.

  python -m laser_jax.evaluate --config=configs/eval.py --config.model.hf_path=... \
      --config.eval.input_file=math500 --config.eval.output_file=/tmp/out.jsonl

  python -m laser_jax.evaluate --config=configs/eval.py:paper --config.model.hf_path=...

Parses the flags and runs `laser_jax.evaluation.evaluator.run` (the output format is in
`laser_jax.evaluation.report`), or with `table.sets` set (configs/eval.py:paper: the paper's
table) `laser_jax.evaluation.paper_table.run`. Bad input is one line and exit status 2
(laser_jax/cli.py).
"""
from laser_jax import cli
from laser_jax.evaluation import evaluator
from laser_jax.evaluation import paper_table


def main(config):
  return paper_table.run(config) if config.table.sets else evaluator.run(config)


if __name__ == "__main__":
  cli.run_config_command(main)
