r"""`python -m laser_jax.aot --config=configs/tpu_v4.py --topology=v4-64 [--out=aot.json]`: will it fit?

Parses the flags and prints `report.compile_step`'s report (`report.format_report`), writing it as
JSON with --out; exits 0 only if every program fits. What is compiled and how it is counted is in
`laser_jax.aot.report`'s docstring. Bad input is one line and exit status 2 (laser_jax/cli.py).
"""
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from laser_jax import cli
from laser_jax.aot import program_report
from laser_jax.aot import report as report_lib
from laser_jax.aot import topology
from laser_jax.training import programs as programs_lib


def main(argv=None):
  if "topology" not in flags.FLAGS:  # defined on the first call only
    flags.DEFINE_string("topology", None, f"TPU slice to compile for: {topology.TOPOLOGY_FORMS}")
    flags.DEFINE_string("out", "", "Write the report as JSON here.")
    flags.DEFINE_list("programs", list(report_lib.PROGRAM_GROUPS), f"Which programs to compile: some of {report_lib.PROGRAM_GROUPS}.")
    flags.DEFINE_string("hlo_dir", "", "Also write each compiled program's HLO text into this directory.")
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    lock_config=True)

  def run(_):
    FLAGS = flags.FLAGS
    if not FLAGS.topology or FLAGS.config is None:
      raise app.UsageError("--config and --topology are required, e.g. "
                           "--config=configs/tpu_v4.py --topology=v4-64")
    programs_lib.apply_libtpu_init_args(FLAGS.config)  # compile with the run's TPU flags
    try:
      tpu = topology.parse_topology(FLAGS.topology)
      log = lambda msg: print(msg, file=sys.stderr, flush=True)
      program_report.HLO_DUMP_DIR = FLAGS.hlo_dir
      report = report_lib.compile_step(FLAGS.config, tpu, log=log, groups=FLAGS.programs)
    except (ValueError, RuntimeError) as e:  # ConfigError is a ValueError
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    report["command"] = " ".join(["python -m laser_jax.aot"] + sys.argv[1:])
    print(report_lib.format_report(report))
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(report, f, indent=2)
    sys.exit(0 if report["fits"] else 1)

  cli.run(run, argv=argv)


if __name__ == "__main__":
  main()
