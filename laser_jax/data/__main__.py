"""`python -m laser_jax.data fetch --out=DIR [--sets=math500,aime24]`: the eval sets from the hub
(`eval_fetch.fetch`); bad input is one line and exit status 2, as for every command (laser_jax/cli.py)."""
from absl import flags

from laser_jax import cli
from laser_jax.data import eval_fetch
from laser_jax.data import eval_sets


def run_cli(argv=None) -> None:
  """The `python -m laser_jax.data` entry point (bad input: one line, exit 2, as every command)."""
  out = flags.DEFINE_string("out", None, "Directory (local or gs://) to write <set>/test.jsonl into.")
  sets = flags.DEFINE_string("sets", ",".join(eval_sets.EVAL_SETS), "Comma-separated eval sets to fetch.")

  def main(args):
    if args[1:] != ["fetch"]:
      cli.fail(f"expected the command `fetch`, got {' '.join(args[1:]) or 'none'} "
               "(usage: python -m laser_jax.data fetch --out=DIR [--sets=math500,aime24])")
    if not out.value:
      cli.fail(f"--out: required, e.g. --out={eval_sets.default_data_dir()}")
    eval_fetch.fetch(out.value, eval_fetch.parse_sets(sets.value))

  cli.run(main, argv=argv)


if __name__ == "__main__":
  run_cli()
