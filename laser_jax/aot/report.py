r"""Will it fit? Compiles every program of one RL step for a TPU slice, on any machine.

  python -m laser_jax.aot --config=configs/tpu_v4.py --topology=v4-64 [--out=aot.json] \
      [--config.rollout.max_new_tokens=4096 ...]

Needs libtpu (`pip install -e '.[tpu]'`), no TPU: `jax.experimental.topologies` describes the
slice's devices and XLA compiles for them, as MaxText's `train_compile.py` does. The programs
are the trainer's own, built by the trainer's own function (`laser_jax.training.run_setup.
build_run_setup`: mesh, optimizer, state shardings, `programs.StepPrograms` with the sampler's
prefill and decode loop, the old / reference log-prob forward, the update with its micro-batch
scan, the eval sampler, and the step's counts), lowered with abstract inputs in the trainer's
shardings: no weight is materialised.

For each program it prints the per-chip HBM the compiler allocates (arguments, outputs,
temporaries, total and share of the chip), the FLOPs, HBM bytes and collective bytes per chip
with every loop multiplied out (XLA's `cost_analysis()` counts a loop body once), and a roofline
time max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / ICI bandwidth) from the
chip's published figures (`topology.CHIPS`). Then one RL step's estimated time, split into rollout and
update, and its MFU. Exit status 0 only if every program fits in the chip's HBM.

How the counts are made (`cost_model.jaxpr_flops` and `cost_model.hlo_costs`):
  * FLOPs: 2*M*N*K of every dot_general in the program's jaxpr, scans multiplied by their length,
    divided by the chip count (the work is split over the slice).
  * HBM bytes: operands + results in HBM of every top-level instruction of the compiled per-chip
    HLO (fusions count what they read and write, not their insides; buffers the compiler placed
    in on-chip memory are not HBM traffic), loops multiplied by their trip count; a slice or
    gather counts what it reads, an in-place dynamic-update-slice or scatter only what it writes, a
    collective its data twice (read and written).
  * Collective bytes: the data moved by each all-gather / all-reduce / reduce-scatter /
    all-to-all / collective-permute per chip, loops multiplied out.
  * A conditional counts its costliest branch (a `lax.switch` over the cache chunks a step reads
    counts every chunk), or nothing when its other branch does nothing (the continuous
    sampler's refill: counted apart, `HloCosts.optional_hbm_bytes`).
  * Decode loops end when every row is done; they are counted at their worst case, every row
    generating `max_new_tokens` tokens. With `rollout.decode_slots` > 0 the sampler programs are
    the continuous-batching ones (`Sampler.continuous_prefill` / `continuous_decode`), the decode
    loop counted at `estimate.continuous_decode_steps` of the call's rows at that length, every
    step reading every cache chunk (an upper bound: the step reads the chunks in use).
Beside that worst case: the fit counting the training state resident during every program
(`ProgramReport.resident_bytes`), the most decode slots that fit next to it, and the step at
real response lengths (`config.aot.response_lengths`, `laser_jax.aot.lengths`), scaled from
these programs by `laser_jax.aot.estimate` (its docstring states the model): expected rollout
and update seconds and the MFU on useful (non-pad) tokens.
These are compile-time estimates: a real slice confirms them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from laser_jax import config_check
from laser_jax.aot import cost_model
from laser_jax.aot import program_report
from laser_jax.aot import estimate as estimate_lib
from laser_jax.aot import lengths as lengths_lib
from laser_jax.aot import real_lengths
from laser_jax.aot import topology
from laser_jax.aot.topology import GiB
from laser_jax.data import synthetic
from laser_jax.models import presets
from laser_jax.rl import objective
from laser_jax.rl import rl_metrics
from laser_jax.training import programs as programs_lib
from laser_jax.training import run_setup as run_setup_lib
from laser_jax.training import tasks


def model_config(config, platform: str | None = "tpu"):
  """The model shape a config trains, without its weights, with its numerics for `platform`
  (`tasks.model_config`; default a TPU slice, whatever runs this): the checkpoint's config.json
  when `model.hf_path` is on this machine, else `model.preset`, else the random-init shape."""
  m = config.model
  if m.hf_path and not os.path.isfile(os.path.join(m.hf_path, "config.json")):
    if not m.preset:
      raise config_check.ConfigError(
          f"config.model.hf_path: {m.hf_path!r} is not on this machine; name the model's shape with "
          f"--config.model.preset (one of {', '.join(sorted(presets.PRESETS))})")
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.hf_path = ""
  tokenizer_size = len(synthetic.build_tokenizer()) if config.data.task == "synthetic" else None
  return tasks.model_config(config, tokenizer_size, platform=platform)


def _sampler_programs(programs, abstract_params, sampling, num_prompts: int, prompt_len: int, prefix: str,
                      calls: float, chip, num_chips, log) -> tuple[list[program_report.ProgramReport], estimate_lib.DecodeProgram]:
  """(the prefill and decode reports, the decode loop's figures for `estimate`) of one call."""
  if sampling.decode_slots:
    return _continuous_programs(programs, abstract_params, sampling, num_prompts, prompt_len, prefix, calls,
                                chip, num_chips, log)
  sampler = programs.sampler
  args = sampler.abstract_prefill_args(abstract_params, num_prompts, prompt_len, sampling)
  prefill = sampler.prefill.trace(*args, sampling=sampling)
  log(f"compiling {prefix} prefill ({num_prompts} prompts x n={sampling.n}, {prompt_len} prompt tokens)")
  report, compiled = program_report.compile_report(f"{prefix} prefill", prefill, calls, chip, num_chips)
  state_shapes = sampler.prefill.eval_shape(*args, sampling=sampling)
  if compiled is None:
    raise RuntimeError(f"{prefix} prefill does not fit: {report.error}")
  state_shardings = compiled.output_shardings
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state_shapes, state_shardings)
  decode = sampler.decode.trace(abstract_params, state, sampling=sampling, prompt_len=prompt_len)
  log(f"compiling {prefix} decode ({sampling.max_new_tokens} tokens in "
      f"{len(sampling.decode_chunk_lengths)} loops)")
  decode_report = program_report.compile_report(f"{prefix} decode", decode, calls, chip, num_chips,
                          loop_trips=sampling.decode_chunk_lengths)[0]
  decode_report.decode_steps = sampling.max_new_tokens
  # Its HBM-bandwidth floor: every step reads this chip's weights and the KV cache written so
  # far (with decode segments, attention reads the chunks written so far: about the prompt
  # plus half the response on average).
  weights = sum(cost_model.shard_bytes(p) for p in jax.tree.leaves(abstract_params))
  cache = sum(cost_model.shard_bytes(x) for x in jax.tree.leaves(state.cache))
  average_fill = estimate_lib.mean_visible_fraction(prompt_len, sampling.decode_chunk_lengths)
  decode_report.ideal_hbm_s = sampling.max_new_tokens * (weights + cache * average_fill) / chip.hbm_bandwidth
  rows = args[3].shape[0]  # row_ids: [rows]
  rows_per_chip = args[3].sharding.shard_shape(args[3].shape)[0]
  # A row's share of the sampling state on this chip: every leaf whose leading axis is the rows.
  row_bytes = sum(cost_model.shard_bytes(x) for x in jax.tree.leaves(state) if x.ndim and x.shape[0] == rows) / rows_per_chip
  decode = estimate_lib.DecodeProgram(
      steps=sampling.max_new_tokens, rows=rows, data_parallel=rows // rows_per_chip,
      compute_s=decode_report.compute_s, hbm_s=decode_report.hbm_s, ici_s=decode_report.ici_s,
      weight_bytes=weights, row_bytes=row_bytes, kv_row_bytes=cache / rows_per_chip, prompt_len=prompt_len,
      chunk_lengths=sampling.decode_chunk_lengths, kv_fill=average_fill, call_rows=rows)
  return [report, decode_report], decode


def _continuous_programs(programs, abstract_params, sampling, num_prompts: int, prompt_len: int, prefix: str,
                         calls: float, chip, num_chips, log) -> tuple[list[program_report.ProgramReport], estimate_lib.DecodeProgram]:
  """`_sampler_programs` for continuous batching (`sampling.decode_slots` > 0): compiles
  `Sampler.continuous_prefill` and `Sampler.continuous_decode`. The decode is one while_loop of
  refill + step over the slots; its costs are multiplied by `estimate.continuous_decode_steps`
  with every row of the call at the budget, each step's attention (a `lax.switch` over the
  chunks in use) at its costliest branch, every chunk visible: an upper bound, which
  `estimate` scales down to the chunks a step uses (with the TPU kernel, `ragged_attention`,
  which declares its cost at the whole window, to each slot's own prefix). A refill (a
  `lax.cond` that does nothing when no slot is free) is counted apart
  (`cost_model.HloCosts.optional_hbm_bytes` and `optional_collective_bytes`, here per step as if
  taken every step): `estimate` adds it in the steps that refill. The decode figures for
  `estimate` are per slot: `rows` = the slots, `row_bytes` a slot's KV cache + per-slot state,
  `kv_fill` 1."""
  sampler = programs.sampler
  args, _ = sampler.abstract_continuous_args(abstract_params, num_prompts, prompt_len, sampling)
  slots = sampling.decode_slots
  log(f"compiling {prefix} prefill (continuous, {num_prompts} prompts x n={sampling.n}, {prompt_len} prompt tokens)")
  prefill = sampler.continuous_prefill.trace(*args, sampling=sampling)
  report, compiled = program_report.compile_report(f"{prefix} prefill", prefill, calls, chip, num_chips)
  if compiled is None:
    raise RuntimeError(f"{prefix} prefill does not fit: {report.error}")
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       sampler.continuous_prefill.eval_shape(*args, sampling=sampling), compiled.output_shardings)
  rows = args[3].shape[0]  # row_ids: [rows]
  steps = estimate_lib.continuous_decode_steps(np.full(rows, sampling.max_new_tokens), slots,
                                              shards=sampler.data_parallel_size)
  log(f"compiling {prefix} decode (continuous, {slots} slots, {rows} rows: {steps} steps at the budget)")
  decode = sampler.continuous_decode.trace(abstract_params, state, sampling=sampling, prompt_len=prompt_len)
  decode_report = program_report.compile_report(f"{prefix} decode", decode, calls, chip, num_chips, loop_trips=(steps,))[0]
  report.decode_slots = decode_report.decode_slots = slots
  decode_report.decode_steps = steps
  weights = sum(cost_model.shard_bytes(p) for p in jax.tree.leaves(abstract_params))
  cache = sum(cost_model.shard_bytes(x) for x in jax.tree.leaves(state.cache))
  decode_report.ideal_hbm_s = steps * (weights + cache) / chip.hbm_bandwidth
  slots_per_chip = state.slot_row.sharding.shard_shape(state.slot_row.shape)[0]
  per_slot = (state.slot_row, state.slot_step, state.last_token, state.next_pos, state.active, state.pending)
  slot_bytes = (cache + sum(cost_model.shard_bytes(x) for x in per_slot)) / slots_per_chip
  decode_program = estimate_lib.DecodeProgram(
      steps=steps, rows=slots, data_parallel=slots // slots_per_chip, compute_s=decode_report.compute_s,
      hbm_s=decode_report.hbm_s, ici_s=decode_report.ici_s, weight_bytes=weights, row_bytes=slot_bytes,
      kv_row_bytes=cache / slots_per_chip, prompt_len=prompt_len, chunk_lengths=sampling.decode_chunk_lengths,
      kv_fill=1.0, call_rows=rows, continuous=True,
      ragged=programs.statics.model_cfg.attention == "splash",  # the step's attention: the TPU kernel
      refill_hbm_s=decode_report.optional_hbm_bytes / steps / chip.hbm_bandwidth,
      refill_ici_s=decode_report.optional_collective_bytes / steps / chip.ici_bandwidth)
  return [report, decode_report], decode_program


PROGRAM_GROUPS = ("rollout", "eval", "logprobs", "update")


def compile_step(config, tpu: topology.Slice, devices=None, log=print,
                 groups: Sequence[str] = PROGRAM_GROUPS) -> dict:
  """Compiles one RL step's programs of `config` for the slice `tpu`; returns the report dict.

  `groups` selects programs: "rollout" (prefill + decode), "eval" (the eval sampler's),
  "logprobs" (old / reference log-probs), "update". `devices` defaults to the slice's devices
  from libtpu.
  """
  unknown = set(groups) - set(PROGRAM_GROUPS)
  if unknown:
    raise ValueError(f"--programs: unknown {sorted(unknown)}; expected some of {PROGRAM_GROUPS}")
  # Read before libtpu loads or anything compiles: a bad lengths file is a one-line error at once.
  response_lengths = lengths_lib.response_lengths(config.aot.response_lengths, config.rollout.max_new_tokens,
                                                  config.batch_size * config.rollout.n)
  devices = topology.slice_devices(tpu) if devices is None else list(devices)
  c = config
  setup = step_setup(c, devices)
  programs, state, mesh = setup.programs, setup.abstract_state, setup.mesh
  rollout_params = programs.abstract_rollout_params(state.params)
  seq_len, micro = setup.seq_len, c.micro_batch_size
  chip, n = tpu.chip, len(devices)

  reports, decode = [], None
  with jax.set_mesh(programs.rollout_mesh):
    if "rollout" in groups:
      per_call = setup.prompts_per_sampler_call(c.batch_size)
      sampler_reports, decode = _sampler_programs(
          programs, rollout_params, setup.sampling, per_call, setup.prompt_bucket, "rollout",
          -(-c.batch_size // per_call), chip, n, log)
      reports += sampler_reports
    if c.eval_every > 0 and "eval" in groups:
      reports += _sampler_programs(programs, rollout_params, setup.eval_sampling,
                                   setup.prompts_per_sampler_call(_eval_set_size(c)), setup.prompt_bucket,
                                   "eval", 0, chip, n, log)[0]
  with jax.set_mesh(mesh):
    if "logprobs" in groups:
      batch = programs_lib.abstract_logprob_batch(mesh, micro, seq_len)
      log(f"compiling old/ref log-probs ({micro} x {seq_len} tokens)")
      calls = c.batch_size * c.rollout.n // micro * setup.logprob_forwards
      reports.append(program_report.compile_report("old/ref log-probs", programs.logprobs.trace(state.params, batch),
                             calls, chip, n)[0])
    if "update" in groups:
      update_batch = programs_lib.abstract_update_batch(
          mesh, setup.num_micro_batches, micro, seq_len, with_ref_logp=c.loss.kl_loss_coef > 0,
          with_ref_score=setup.exact_score)
      normalisers = jax.eval_shape(lambda mask: objective.loss_normalisers(setup.loss_cfg, mask),
                                   jax.ShapeDtypeStruct((setup.rows_per_update, seq_len), np.float32))
      log(f"compiling update ({setup.num_micro_batches} micro-batches of {micro} x {seq_len} tokens)")
      reports.append(program_report.compile_report("update", programs.update.trace(state, update_batch, normalisers,
                                                             jax.ShapeDtypeStruct((), jnp.bool_)),
                             setup.updates_per_step, chip, n)[0])
  resident = real_lengths.set_resident_bytes(reports, setup, sampler_holds_params=rollout_params is state.params)
  report = _summary(c, tpu, setup.model_cfg, reports, setup.rows_per_update * setup.updates_per_step,
                    seq_len, setup.logprob_forwards)
  report["program_groups"] = list(groups)
  report["resident_state_bytes"] = resident
  report["response_lengths"] = response_lengths.as_dict()
  if decode is not None:  # the rollout decode loop's figures `estimate` scales (per chip, per call)
    report["rollout_decode"] = dataclasses.asdict(decode)
  report.update(real_lengths.expected(c, setup, tpu, reports, decode, response_lengths))
  return report


def step_setup(config, devices, platform: str | None = "tpu") -> run_setup_lib.RunSetup:
  """The trainer's own setup (`run_setup.build_run_setup`: mesh, optimizer, state shardings,
  programs, sampling settings) of `config` on `devices`, for the model `model_config` gives
  with its numerics for `platform` (None: this machine's, as the trainer resolves them).

  Token ids change no shape, and the tokenizer may not be on this machine: config.laser's
  self_reward_token_id (else the vocabulary's last id), EOS 0 and pad 0 stand in for the
  tokenizer's."""
  config_check.validate(config, num_devices=len(devices))
  model_cfg = model_config(config, platform)
  zc_id = config.laser.self_reward_token_id
  return run_setup_lib.build_run_setup(
      config, model_cfg, devices=devices, eos_ids=(0,), pad_id=0,
      self_reward_token_id=zc_id if zc_id >= 0 else model_cfg.vocab_size - 1)


def _eval_set_size(c) -> int:
  """Problems of a periodic evaluation (`tasks.build_task`'s eval prompts), at most: prompts over
  data.max_prompt_len are dropped. A files task's whole eval set (data.eval_size = 0) is only
  known from its files: one batch stands in for it."""
  if c.data.task == "synthetic":
    return min(c.data.eval_size or c.data.synthetic_eval_size, c.data.synthetic_eval_size)
  return c.data.eval_size or c.batch_size


def _summary(c, tpu: topology.Slice, model_cfg, reports: list[program_report.ProgramReport], rows_per_step: int,
             seq_len: int, logprob_forwards: int) -> dict:
  """One RL step's estimated time (rollout = sampler + old/ref log-probs, update) and its MFU."""
  def total(names):
    return sum(r.roofline_s * r.calls_per_step for r in reports if r.name in names)
  rollout_s = total({"rollout prefill", "rollout decode", "old/ref log-probs"})
  decode = [r for r in reports if r.name == "rollout decode"]
  decode_vs_floor = decode[0].roofline_s / decode[0].ideal_hbm_s if decode else float("nan")
  update_s = total({"update"})
  step_s = rollout_s + update_s
  # Model FLOPs over every token of the step's rows, padding included.
  model_flops = rl_metrics.step_model_flops(model_cfg.num_params(), rows_per_step * seq_len, logprob_forwards)
  mfu = model_flops / (step_s * tpu.chip.peak_flops * tpu.num_chips) if step_s > 0 else 0.0
  return {
      "topology": tpu.name, "libtpu_topology": tpu.topology_name, "num_chips": tpu.num_chips,
      "chip": dataclasses.asdict(tpu.chip), "model_params": model_cfg.num_params(),
      "programs": [r.as_dict() for r in reports],
      "step": {"rollout_s": rollout_s, "update_s": update_s, "step_s": step_s, "mfu": mfu,
               "model_flops": model_flops, "decode_vs_hbm_floor": decode_vs_floor},
      "fits": all(r.fits for r in reports),
      "fits_with_10pct_spare": all(r.hbm_fraction <= 0.9 for r in reports),
      # Counting the training state resident beside each program (`resident_bytes`).
      "fits_with_resident": all(r.fits and r.hbm_fraction_with_resident <= 1 for r in reports),
      "fits_with_resident_10pct_spare": all(r.hbm_fraction_with_resident <= 0.9 for r in reports),
  }


def format_report(report: dict) -> str:
  """The Markdown tables `main` prints."""
  gib = lambda b: f"{b / GiB:.2f}"
  lines = [f"## {report['topology']} ({report['num_chips']} x TPU {report['chip']['name']}, "
           f"{report['chip']['hbm_bytes'] / GiB:.2f} GiB HBM per chip), "
           f"{report['model_params'] / 1e9:.2f}B parameters",
           "",
           "| program | calls/step | args GiB | out GiB | temp GiB | total GiB | % HBM | fits | TFLOP | "
           "HBM GB | coll. GB (in loops) | roofline s | bound | compile s |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
  for r in report["programs"]:
    name = r["name"] + (f" (continuous, {r['decode_slots']} slots)" if r.get("decode_slots") else "")
    row = (f"| {name} | {r['calls_per_step']:g} | {gib(r['argument_bytes'])} | "
           f"{gib(r['output_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['total_bytes'])} | "
           f"{100 * r['hbm_fraction']:.1f} | {'yes' if r['fits'] else 'NO'} | {r['flops'] / 1e12:.2f} | "
           f"{r['hbm_bytes'] / 1e9:.2f} | {r['collective_bytes'] / 1e9:.2f} "
           f"({r['collective_bytes_in_loops'] / 1e9:.2f}) | {r['roofline_s']:.3g} | {r['bound']} | "
           f"{r['compile_s']:.0f} |")
    lines.append(row.replace("nan (nan)", "-").replace("| nan |", "| - |"))
  if any(r["error"] for r in report["programs"]):
    lines += ["", "Programs marked NO with '-' were refused by the compiler; temp GiB is what it asked for."]
  s = report["step"]
  partial = [g for g in PROGRAM_GROUPS if g not in report.get("program_groups", PROGRAM_GROUPS)]
  lines += ["", (f"Partial report: {', '.join(partial)} not compiled (--programs); the step "
                 f"estimate leaves them out. " if partial else "") +
            f"One RL step (compile-time roofline estimate): rollout {s['rollout_s']:.1f} s "
            f"(sampling + old/ref log-probs), update {s['update_s']:.1f} s, step {s['step_s']:.1f} s, "
            f"MFU {100 * s['mfu']:.1f}%. The rollout decode loop's estimate is "
            f"{s['decode_vs_hbm_floor']:.2f}x its HBM-bandwidth floor (weights + KV cache read once "
            f"per token).",
            f"Every program fits: {'yes' if report['fits'] else 'NO'}; with >= 10% HBM to spare: "
            f"{'yes' if report['fits_with_10pct_spare'] else 'no'}."]
  lines += real_lengths.format_resident(report) + real_lengths.format_expected(report)
  return "\n".join(lines)
