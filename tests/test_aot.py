"""laser_jax.aot: slice names, loop-aware cost counts, and the whole report for a small model on
a TPU v4-8 compiled on this CPU (when libtpu is installed: the `test` extra brings it)."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laser_jax import default_config
from laser_jax.aot import cost_model
from laser_jax.aot import program_report
from laser_jax.aot import report as report_lib
from laser_jax.aot import topology as topology_lib
from laser_jax.models import attention as attention_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,chips,topology,wrap", [
    ("v4-8", 4, "v4:2x2x1", (False, False, False)),
    ("v4-64", 32, "v4:2x4x4", (False, False, False)),
    ("v4-128", 64, "v4:4x4x4", (True, True, True)),
    ("v5p-128", 64, "v5:4x4x4", (True, True, True)),
    ("v5litepod-16", 16, "v5e:4x4", (False, False, False)),
    ("v5e-256", 256, "v5e:16x16", (True, True, False)),
    ("v6e-8", 8, "v6e:2x4", (False, False, False)),
])
def test_slice_names_give_libtpu_topologies(name, chips, topology, wrap):
  tpu = topology_lib.parse_topology(name)
  assert (tpu.num_chips, tpu.topology_name, tpu.wrap) == (chips, topology, wrap)


@pytest.mark.parametrize("name", ["v4-7", "v4-6", "v3-8", "v5e-3", "tpu", ""])
def test_unknown_slice_is_a_one_line_error_listing_the_forms(name):
  with pytest.raises(ValueError, match=r"--topology=.*v4-8 \.\.\. v4-1024") as e:
    topology_lib.parse_topology(name)
  assert "\n" not in str(e.value)


def test_jaxpr_flops_multiplies_scans_and_while_loops_out():
  w1, w2 = jnp.ones((16, 32)), jnp.ones((16, 16))

  def f(xs, y):
    def body(c, x):
      return c + jnp.sum(x @ w1), None  # [8, 16] @ [16, 32]: 2 * 8 * 32 * 16 per step
    total, _ = jax.lax.scan(body, 0.0, xs)
    y = jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] @ w2), (0, y))[1]
    z = jax.lax.cond(total > 0, lambda: y @ w2, lambda: y)  # counts the dearer branch
    return z

  jaxpr = jax.make_jaxpr(f)(jnp.ones((5, 8, 16)), jnp.ones((4, 16))).jaxpr
  per_while_step = 2 * 4 * 16 * 16
  scan = 5 * 2 * 8 * 32 * 16
  assert cost_model.jaxpr_flops(jaxpr, while_trip_counts=(3,)) == scan + 3 * per_while_step + per_while_step
  # Without a trip count a while loop counts once.
  assert cost_model.jaxpr_flops(jaxpr) == scan + per_while_step + per_while_step


def test_jaxpr_flops_count_a_pallas_kernel_once_per_grid_point():
  """The splash-attention kernel's matmuls, counted over its whole grid (every [block, block]
  tile, as if none were skipped): the dense 2 x [T, T] x D products of every head."""
  b, t, n, kv, d = 2, 256, 4, 2, 16
  q, k = jnp.ones((b, t, n, d)), jnp.ones((b, t, kv, d))
  valid = jnp.ones((b, t), bool)
  splash = lambda q, k: attention_lib.attend_splash(q, k, k, valid, block=128, interpret=True)
  jaxpr = jax.make_jaxpr(splash)(q, k).jaxpr
  assert cost_model.jaxpr_flops(jaxpr) == 2 * 2 * b * n * t * t * d


_HLO = """HloModule m, entry_computation_layout={(bf16[32,256]{1,0})->bf16[128,256]{1,0}}

%cond (p: (s32[], bf16[128,256], bf16[32,256])) -> pred[] {
  %p = (s32[], bf16[128,256]{1,0}, bf16[32,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (p.1: (s32[], bf16[128,256], bf16[32,256])) -> (s32[], bf16[128,256], bf16[32,256]) {
  %p.1 = (s32[], bf16[128,256]{1,0}, bf16[32,256]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %w = bf16[32,256]{1,0} get-tuple-element(%p.1), index=2
  %all-gather = bf16[128,256]{1,0} all-gather(%w), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i.1, %one)
  ROOT %t = (s32[], bf16[128,256]{1,0}, bf16[32,256]{1,0}) tuple(%next, %all-gather, %w)
}

ENTRY %main (w.1: bf16[32,256]) -> bf16[128,256] {
  %w.1 = bf16[32,256]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = bf16[128,256]{1,0} broadcast(%w.1), dimensions={}
  %t.1 = (s32[], bf16[128,256]{1,0}, bf16[32,256]{1,0}) tuple(%zero, %init, %w.1)
  %loop = (s32[], bf16[128,256]{1,0}, bf16[32,256]{1,0}) while(%t.1), condition=%cond, body=%body
  ROOT %out = bf16[128,256]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_hlo_costs_read_the_trip_count_from_the_loop_condition():
  costs = cost_model.hlo_costs(_HLO)
  gathered = 128 * 256 * 2
  assert costs.collective_bytes == costs.collective_bytes_in_loops == 5 * gathered
  assert costs.loops_without_trip_count == 0
  # HBM: the broadcast (reads 32x256, writes 128x256) once; per step the gather (read + write of
  # what it moves, counted as 2x) and the s32 add (3 scalars); the compare (2 scalars, 1 byte out).
  broadcast = 32 * 256 * 2 + gathered
  assert costs.hbm_bytes == broadcast + 5 * (2 * gathered + 12) + 5 * (8 + 1)
  # The breakdown names every instruction's share (the collective's too) and sums to the total.
  breakdown = {}
  assert cost_model.hlo_costs(_HLO, breakdown=breakdown).hbm_bytes == costs.hbm_bytes
  assert breakdown[("body", "all-gather", "all-gather", "")] == 5 * 2 * gathered
  assert breakdown[("main", "init", "broadcast", "")] == broadcast
  assert sum(breakdown.values()) == costs.hbm_bytes


def test_hlo_costs_take_given_trip_counts_for_data_dependent_loops():
  hlo = _HLO.replace("ROOT %lt = pred[] compare(%i, %limit), direction=LT",
                     "%lt = pred[] compare(%i, %limit), direction=LT\n  ROOT %and = pred[] and(%lt, %lt)")
  assert cost_model.hlo_costs(hlo).loops_without_trip_count == 1
  assert cost_model.hlo_costs(hlo).collective_bytes == 128 * 256 * 2
  assert cost_model.hlo_costs(hlo, while_trip_counts=(9,)).collective_bytes == 9 * 128 * 256 * 2


def test_compiled_loop_costs_scale_with_the_trip_count_where_xla_counts_the_body_once():
  mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  xs = jax.ShapeDtypeStruct((14, 8, 256), jnp.float32, sharding=NamedSharding(mesh, P()))

  def f(w, xs, length):
    return jax.lax.scan(lambda c, x: (c + jnp.tanh(x @ w).sum(), None), 0.0, xs[:length])[0]

  results = {}
  for length in (7, 14):
    traced = jax.jit(f, static_argnums=2).trace(w, xs, length)
    compiled = traced.lower().compile()
    results[length] = (cost_model.hlo_costs(compiled.as_text()), cost_model.jaxpr_flops(traced.jaxpr.jaxpr),
                       compiled.cost_analysis()["flops"])
  (c7, f7, xla7), (c14, f14, xla14) = results[7], results[14]
  assert f7 == 7 * 2 * 8 * 256 * 256 and f14 == 2 * f7
  assert xla7 == xla14  # XLA's own count ignores the trip count: why aot counts itself
  assert c7.collective_bytes_in_loops > 0
  assert c14.collective_bytes_in_loops == 2 * c7.collective_bytes_in_loops
  # Seven more steps add seven loop bodies, each reading at least the local [64, 256] f32 shard.
  per_step = (c14.hbm_bytes - c7.hbm_bytes) / 7
  assert per_step >= 64 * 256 * 4


def _small_config():
  c = default_config.get_config()
  c.model.preset = "qwen2.5-0.5b"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.logprob_chunk = 64
  c.data.task = "files"
  c.data.train_files = "unused.jsonl"  # The AOT report reads no data.
  c.data.max_prompt_len = 64
  c.sft.steps = 0
  c.batch_size = 8
  c.rollout.n = 4
  c.rollout.prompts_per_chunk = 4
  c.rollout.max_new_tokens = 128
  c.rollout.recompute_old_logprobs = True
  c.micro_batch_size = 16
  c.eval.max_new_tokens = 64
  c.laser.self_reward_token_id = 151652
  return c


def _libtpu_or_skip():
  if not topology_lib.libtpu_available():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): the TPU compile is not checked")


def test_small_model_compiles_for_a_v4_8_and_its_counts_match_the_model(monkeypatch):
  _libtpu_or_skip()
  import dataclasses
  from laser_jax.models import presets
  two_layers = dataclasses.replace(presets.PRESETS["qwen2.5-0.5b"], num_layers=2)
  monkeypatch.setitem(presets.PRESETS, "qwen2.5-0.5b", two_layers)
  c = _small_config()
  report = report_lib.compile_step(c, topology_lib.parse_topology("v4-8"), log=lambda _: None)
  names = [p["name"] for p in report["programs"]]
  assert names == ["rollout prefill", "rollout decode", "eval prefill", "eval decode", "old/ref log-probs",
                   "update"]
  assert report["fits"] and report["num_chips"] == 4
  by_name = {p["name"]: p for p in report["programs"]}
  cfg = dataclasses.replace(two_layers, dtype="bfloat16", remat=True)
  # The update's f32 parameters + two Adam moments are sharded over the 4 chips (fsdp) and are
  # both argument and (donated) output.
  state_bytes = 3 * 4 * cfg.num_params() / 4
  update = by_name["update"]
  assert state_bytes <= update["argument_bytes"] < 1.1 * state_bytes
  assert update["alias_bytes"] >= 0.9 * state_bytes
  # Update FLOPs against the model, per chip: 8 prompts x 4 responses of 64 + 128 + 1 tokens,
  # 6 per weight and token (forward + backward) plus 2 for the recomputed forward (remat, and
  # the checkpointed head chunks). The head runs over the rows padded to a multiple of
  # logprob_chunk (193 -> 256 tokens); the tied embedding's lookup is a gather. Measured: 0.995
  # of this (attention adds about 1%, not every backward product is needed). An update counted
  # over one micro-batch instead of both would be off by 2x.
  rows, seq, padded = 8 * 4, 64 + 128 + 1, 256
  head = cfg.vocab_size * cfg.hidden_size
  weights = 8 * rows * ((cfg.num_params() - head) * seq + head * padded) / 4
  assert 0.97 * weights < update["flops"] < 1.05 * weights
  # The decode loop is counted at every row generating 128 tokens; FSDP weights are gathered
  # inside it every step.
  decode = by_name["rollout decode"]
  assert decode["collective_bytes_in_loops"] > 128 * 0.5 * 4 * cfg.num_params() * 3 / 4
  assert report["step"]["step_s"] > 0 and 0 < report["step"]["mfu"] < 1
  # The training state stays resident while the sampler runs: beside the sampler (which samples
  # from the training parameters here) the two Adam moments; nothing beside the update.
  assert update["resident_bytes"] == 0
  assert decode["resident_bytes"] == pytest.approx(2 * 4 * cfg.num_params() / 4, rel=1e-3)
  assert decode["hbm_fraction_with_resident"] == pytest.approx(
      (decode["total_bytes"] + decode["resident_bytes"]) / decode["capacity_bytes"])
  # A decode slot's bytes on its chip: its bf16 KV cache (2 layers x K and V x 2 KV heads x 64 x
  # (64 prompt + 128 response) slots) plus its small token / log-prob buffers.
  kv = 2 * 2 * cfg.num_kv_heads * cfg.head_dim * (64 + 128) * 2
  assert kv <= report["decode_slots"]["row_bytes"] < 1.05 * kv
  # As configured (static sampler, padded update) the real lengths save only the calls whose
  # longest row stops early; the padded passes cost the worst case.
  expected = report["expected"]
  assert expected["slots"] == 0 and expected["packed_tokens"] == expected["padded_tokens"] == 32 * 193
  assert expected["update_s"] == pytest.approx(report["step"]["update_s"])
  assert expected["decode_steps"] <= 2 * 128 and expected["step_s"] <= report["step"]["step_s"] * (1 + 1e-9)
  assert "At real response lengths" in report_lib.format_report(report)


def test_cli_reports_a_bad_topology_in_one_line_and_exit_2():
  proc = subprocess.run([sys.executable, "-m", "laser_jax.aot", "--config=configs/tpu_v4.py",
                         "--topology=v4-7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [l for l in errors if "--topology='v4-7'" in l] and len(errors) == 1


def test_rollout_layout_takes_the_weight_gathers_out_of_the_decode_loop(monkeypatch):
  """rollout.tensor_parallel: the decode loop reads a tensor-parallel bf16 copy of the weights
  instead of all-gathering the f32 fsdp shards at every token."""
  _libtpu_or_skip()
  import dataclasses
  from laser_jax.models import presets
  monkeypatch.setitem(presets.PRESETS, "qwen2.5-0.5b",
                      dataclasses.replace(presets.PRESETS["qwen2.5-0.5b"], num_layers=2))
  decode = {}
  for k in (0, 4):
    c = _small_config()
    c.rollout.tensor_parallel = k
    report = report_lib.compile_step(c, topology_lib.parse_topology("v4-8"), log=lambda _: None,
                                     groups=("rollout",))
    assert [p["name"] for p in report["programs"]] == ["rollout prefill", "rollout decode"]
    assert "not compiled" in report_lib.format_report(report)
    decode[k] = next(p for p in report["programs"] if p["name"] == "rollout decode")
  # Training layout: every step gathers 3/4 of the weights (at least in bf16) on every chip.
  cfg = presets.PRESETS["qwen2.5-0.5b"]
  steps = 128
  assert decode[0]["collective_bytes_in_loops"] >= steps * 2 * cfg.num_params() * 3 / 4
  # Tensor parallel over the 4 chips: only activations move (all-reduces of [rows, hidden]).
  assert decode[4]["collective_bytes_in_loops"] < decode[0]["collective_bytes_in_loops"] / 20
  assert decode[4]["roofline_s"] < decode[0]["roofline_s"] / 2


def test_continuous_rollout_compiles_its_slot_programs_for_a_v4_8(monkeypatch, tmp_path):
  """rollout.decode_slots > 0: the report compiles `Sampler.continuous_prefill` / `continuous_decode`
  (not the static pair), counts the decode loop at `estimate.continuous_decode_steps` with every
  row at the budget, and sizes a slot by its KV cache."""
  _libtpu_or_skip()
  import dataclasses
  from laser_jax.models import presets
  cfg = dataclasses.replace(presets.PRESETS["qwen2.5-0.5b"], num_layers=2)
  monkeypatch.setitem(presets.PRESETS, "qwen2.5-0.5b", cfg)
  c = _small_config()
  c.rollout.decode_slots = 8
  monkeypatch.setattr(program_report, "HLO_DUMP_DIR", str(tmp_path))
  report = report_lib.compile_step(c, topology_lib.parse_topology("v4-8"), log=lambda _: None,
                                   groups=("rollout",))
  programs = report["programs"]
  assert [p["name"] for p in programs] == ["rollout prefill", "rollout decode"]
  decode_hlo = (tmp_path / "rollout_decode.hlo.txt").read_text()
  assert decode_hlo.count('custom_call_target="tpu_custom_call"') == 2 * 3  # 2 layers x 3 cache chunks
  assert [p["decode_slots"] for p in programs] == [8, 8]
  assert report["fits"] and "rollout decode (continuous, 8 slots)" in report_lib.format_report(report)
  decode = programs[1]
  # A call: 4 prompts x n=4 = 16 rows on 8 slots, each row 128 steps: two rounds.
  assert decode["decode_steps"] == 2 * 128
  # Per slot on its chip (8 slots over data = 4): a bf16 KV cache of 2 layers x K and V x 2 KV
  # heads x 64 x (64 prompt + 128 response) positions, its bool mask, and six int32 / bool
  # per-slot fields (row, step, last token, position; active, pending).
  kv = 2 * 2 * cfg.num_kv_heads * cfg.head_dim * (64 + 128) * 2
  slot = report["rollout_decode"]
  assert slot["continuous"] and (slot["rows"], slot["call_rows"], slot["steps"]) == (8, 16, 256)
  # The TPU attention ("auto" = splash): the step's attention is the ragged Pallas kernel, lowered
  # by Mosaic for v4 here, and the estimate replays each slot's own prefix.
  assert slot["ragged"]
  assert slot["row_bytes"] == kv + (64 + 128) + 4 * 4 + 2
  # The slots' cache is an argument of the decode program (2 slots per chip) besides the weights.
  assert decode["argument_bytes"] > 2 * kv
  # Its FLOPs: 256 steps of 8 slots through the 2-layer model (2 per weight and token; the
  # tied head and the attention over the cache on top), over 4 chips.
  weights = 2 * 256 * 8 * cfg.num_params() / 4
  assert 0.9 * weights < decode["flops"] < 1.3 * weights


_SLICING_HLO = """HloModule m

%fused (param_0: f32[1024,256], param_1: s32[], param_2: f32[8,256]) -> f32[8,256] {
  %param_0 = f32[1024,256]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = f32[8,256]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %rows = f32[8,256]{1,0} dynamic-slice(%param_0, %param_1, %zero), dynamic_slice_sizes={8,256}
  ROOT %sum = f32[8,256]{1,0} add(%rows, %param_2)
}

ENTRY %main (table: f32[1024,256], i: s32[], x: f32[8,256]) -> f32[16,256] {
  %table = f32[1024,256]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = f32[8,256]{1,0} parameter(2)
  %zero.1 = s32[] constant(0)
  %fusion = f32[8,256]{1,0} fusion(%table, %i, %x), kind=kLoop, calls=%fused
  %slice = f32[8,256]{1,0} dynamic-slice(%table, %i, %zero.1), dynamic_slice_sizes={8,256}
  ROOT %both = f32[16,256]{1,0} concatenate(%fusion, %slice), dimensions={0}
}
"""


def test_hlo_costs_count_an_in_place_scatter_by_what_it_writes():
  """A per-row scatter into a donated buffer (the decode step's cache writes) is done in place:
  it moves its indices and updates (read and written), not the whole buffer."""
  cache = jnp.zeros((64, 4, 128, 256))
  rows = jnp.ones((64, 4, 128))
  write = jax.jit(lambda c, i, u: c.at[jnp.arange(64), :, :, i].set(u), donate_argnums=0)
  costs = cost_model.hlo_costs(write.lower(cache, jnp.arange(64) % 256, rows).compile().as_text())
  assert 2 * rows.nbytes <= costs.hbm_bytes <= 2 * rows.nbytes + 4096  # + the indices
  assert costs.hbm_bytes < cache.nbytes / 100


def test_hlo_costs_count_only_the_rows_a_slice_reads():
  """An embedding lookup or a scan reading layer i of stacked weights reads a slice, not the table."""
  rows, out = 8 * 256 * 4, 16 * 256 * 4
  fusion = rows + 4 + rows + rows  # the sliced rows, the index, x; writes its result
  slice_ = rows + rows  # reads the rows it returns, writes them
  concatenate = 2 * rows + out
  assert cost_model.hlo_costs(_SLICING_HLO).hbm_bytes == fusion + slice_ + concatenate


def test_aot_compiles_from_the_trainers_own_setup():
  """`report.step_setup` (what `compile_step` compiles) and a `Trainer` build their mesh,
  optimizer, state, programs, sampling settings and step counts with one function: with this
  machine's numerics, every static setting, shape and sharding agrees; only the tokenizer's EOS
  and pad ids (no shape depends on them) are stand-ins in the report."""
  import dataclasses
  from laser_jax.generate import sampler as sampler_lib
  from laser_jax.training import trainer as trainer_lib
  c = default_config.get_config()
  c.data.synthetic_train_size, c.data.synthetic_eval_size = 64, 8
  c.data.max_prompt_len, c.rollout.max_new_tokens = 40, 24
  c.sft.steps = 0
  c.batch_size, c.mini_batch_size, c.micro_batch_size, c.rollout.n = 8, 4, 8, 4
  c.loss.kl_loss_coef = 0.01  # a reference forward and a ref_logp field in the update
  c.rollout.recompute_old_logprobs = True
  devices = jax.devices()[:1]
  trainer = trainer_lib.Trainer(c, devices=devices)
  aot_config = c.copy_and_resolve_references()
  aot_config.laser.self_reward_token_id = trainer.zc_id  # aot loads no tokenizer to resolve the token
  aot = report_lib.step_setup(aot_config, devices, platform=None)

  assert aot.statics == trainer.statics
  for ours, theirs in ((aot.sampling, trainer.sampling), (aot.eval_sampling, trainer.eval_sampling)):
    assert dataclasses.replace(ours, eos_ids=trainer.eos_ids, pad_id=trainer.pad_id) == theirs
  assert aot.mesh.shape == trainer.mesh.shape and list(aot.mesh.devices.flat) == devices
  aot_leaves, aot_tree = jax.tree.flatten_with_path(aot.abstract_state)
  leaves, tree = jax.tree.flatten_with_path(trainer.abstract_state())
  assert aot_tree == tree
  assert [(p, s.shape, s.dtype, s.sharding) for p, s in aot_leaves] == [
      (p, s.shape, s.dtype, s.sharding) for p, s in leaves]
  assert jax.tree.leaves(aot.state_shardings) == jax.tree.leaves(trainer.state_shardings)
  assert [float(aot.schedule(k)) for k in (0, 7, 15)] == [float(trainer.schedule(k)) for k in (0, 7, 15)]
  # The step's counts, by hand: 8 prompts in updates of 4 (2 updates), 4 x 4 = 16 rows each in
  # micro-batches of 8 (2), recomputed old + reference log-probs (2 forwards per row); prompts
  # of up to 40 tokens pad to the 64 bucket, + 24 response tokens + 1 spare column.
  counts = lambda s: (s.num_prompts_per_update, s.updates_per_step, s.num_micro_batches, s.rows_per_update,
                      s.needs_ref, s.exact_score, s.logprob_forwards, s.prompt_bucket, s.seq_len)
  assert counts(aot) == counts(trainer.run_setup) == (4, 2, 2, 16, True, False, 2, 64, 64 + 24 + 1)
  assert (trainer.num_prompts_per_update, trainer.updates_per_step, trainer.needs_ref, trainer.exact_score) == (
      4, 2, True, False)
  # The prompt bucket bounds every training prompt's (the sampler pads a call to its longest).
  longest = max(len(p.token_ids) for p in trainer.task.train_prompts + trainer.task.eval_prompts)
  assert sampler_lib.bucket_length(longest, trainer.programs.sampler.min_bucket) <= aot.prompt_bucket


def test_libtpu_init_args_from_the_config_join_the_environment_which_wins(monkeypatch):
  from laser_jax.training import programs
  c = default_config.get_config()
  c.libtpu_init_args = "--xla_a=false --xla_b=1"
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_b=2")
  programs.apply_libtpu_init_args(c)
  assert os.environ["LIBTPU_INIT_ARGS"].split() == ["--xla_b=2", "--xla_a=false"]
  monkeypatch.delenv("LIBTPU_INIT_ARGS")
  programs.apply_libtpu_init_args(default_config.get_config())  # "" adds nothing
  assert "LIBTPU_INIT_ARGS" not in os.environ


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/tpu_v4.py", "configs/orz_7b.py", "configs/octothinker_3b.py"])
def test_paper_configs_fit_their_v4_64_with_10_percent_to_spare(config, tmp_path):
  """The full report at the reference shapes: 7-16 minutes and ~15 GiB of RAM each."""
  _libtpu_or_skip()
  out = tmp_path / "report.json"
  proc = subprocess.run([sys.executable, "-m", "laser_jax.aot", f"--config={config}", "--topology=v4-64",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["fits_with_10pct_spare"], [(p["name"], p["hbm_fraction"]) for p in report["programs"]]
  assert report["step"]["decode_vs_hbm_floor"] <= 2.0


# ---- the step at real response lengths (laser_jax/aot/lengths.py, estimate.py) -----------------

from laser_jax.aot import estimate as estimate_lib
from laser_jax.aot import lengths as lengths_lib
from laser_jax.config_check import ConfigError


def test_named_long_tail_has_the_documented_mean_and_truncated_tail():
  r = lengths_lib.response_lengths("rlvr_long_tail", budget=8192, rows=1024)
  assert r.tokens.shape == (1024,) and r.tokens.min() >= 1 and r.tokens.max() == 8192
  assert abs(r.mean / 8192 - 1 / 3) < 0.01 and abs(r.truncated_fraction - 0.05) < 0.005
  assert np.median(r.tokens) < r.mean  # long-tailed: the median below the mean
  again = lengths_lib.response_lengths("rlvr_long_tail", budget=8192, rows=1024)
  np.testing.assert_array_equal(r.tokens, again.tokens)  # no sampling noise, a fixed order


def test_clipped_lognormal_mean_matches_scipy():
  from scipy import integrate, stats
  mu, sigma, budget = 7.5, 0.9, 8192
  dist = stats.lognorm(s=sigma, scale=np.exp(mu))
  # E[min(X, B)] = integral of P(X > x) over [0, B].
  reference = integrate.quad(dist.sf, 0, budget, limit=200)[0]
  assert lengths_lib._clipped_lognormal_mean(mu, sigma, budget) == pytest.approx(reference, rel=1e-6)


def test_lengths_from_a_json_list_and_from_a_runs_metrics(tmp_path):
  from laser_jax.rl import rl_metrics
  observed = tmp_path / "lengths.json"
  observed.write_text(json.dumps([10, 20, 30, 40, 5000]))
  r = lengths_lib.response_lengths(str(observed), budget=64, rows=10)
  assert sorted(r.tokens.tolist()) == [10, 10, 20, 20, 30, 30, 40, 40, 64, 64]  # quantiles, clipped
  # metrics.jsonl records as the trainer writes them: the family at the run's mean and truncation.
  records = []
  for lengths, finished in (([100, 300, 1024, 500], [1, 1, 0, 1]), ([200, 400, 600, 1024], [1, 1, 1, 0])):
    m = rl_metrics.rollout_metrics(jnp.zeros(4), jnp.asarray(lengths), jnp.asarray(finished, bool),
                                   jnp.zeros(4, jnp.int32), 1)
    records.append({"step": len(records) + 1, **{k: float(v) for k, v in m.items()}})
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n" + json.dumps({"step": 3, "eval/x": 1}))
  r = lengths_lib.response_lengths(str(metrics), budget=1024, rows=4096)
  assert abs(r.mean - 518.5) < 0.01 * 518.5 and abs(r.truncated_fraction - 0.25) < 0.01


@pytest.mark.parametrize("content", [None, "not json {", "[]", "[3, -1]", '["a"]', '{"step": 1}\n{"step": 2}',
                                     '{"rollout/response_length/mean": 10, "rollout/truncated_frac": 0}'])
def test_a_lengths_file_that_does_not_parse_is_one_line_naming_key_and_file(tmp_path, content):
  path = tmp_path / "lengths.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ConfigError) as e:
    lengths_lib.response_lengths(str(path), budget=64, rows=8)
  message = str(e.value)
  assert message.startswith("config.aot.response_lengths: ") and str(path) in message and "\n" not in message


def test_cli_rejects_a_bad_lengths_file_in_one_line_and_exit_2(tmp_path):
  bad = tmp_path / "lengths.json"
  bad.write_text("[1, 2,")
  proc = subprocess.run([sys.executable, "-m", "laser_jax.aot", "--config=configs/tpu_v4.py", "--topology=v4-8",
                         f"--config.aot.response_lengths={bad}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "config.aot.response_lengths" in errors[0] and str(bad) in errors[0]


def _step_by_step_slots(tokens, slots, refill_every):
  """Independent reference: run the schedule one decode step at a time."""
  queue, remaining, step = list(tokens), [0] * slots, 0
  while queue or any(remaining):
    if step % refill_every == 0:
      for s in range(slots):
        if remaining[s] == 0 and queue:
          remaining[s] = queue.pop(0)
    remaining = [max(0, r - 1) for r in remaining]
    step += 1
  return step


def test_decode_steps_static_and_continuous_by_hand_and_step_by_step():
  tokens = np.array([5, 1, 1, 1])
  assert estimate_lib.static_decode_steps(tokens, rows_per_call=2) == 5 + 1
  assert estimate_lib.continuous_decode_steps(tokens, slots=2) == 5  # three short rows share a slot
  tokens = np.array([3, 1, 1, 1, 1])
  assert estimate_lib.continuous_decode_steps(tokens, slots=2) == 4
  assert estimate_lib.continuous_decode_steps(tokens, slots=2, refill_every=2) == 5  # refills at 2 and 4
  rng = np.random.default_rng(1)
  for _ in range(20):
    tokens = rng.integers(1, 40, size=rng.integers(1, 30))
    slots, every = int(rng.integers(1, 8)), int(rng.integers(1, 5))
    assert estimate_lib.continuous_decode_steps(tokens, slots, every) == _step_by_step_slots(tokens, slots, every)


def test_packed_tokens_and_slot_sizing_by_hand():
  # Rows of 10 tokens, 2 shards: 7 | 6 | 4+3 | 2 -> four packed rows = two micro-batches of 2 x 10.
  assert estimate_lib.packed_tokens(np.array([3, 7, 2, 6, 4]), micro_batch_tokens=10, shards=2) == 40
  # 100 bytes free at 90% of 1000 with 800 fixed: 4 slots of 25 bytes per chip, 8 chips.
  assert estimate_lib.max_slots(1000, 800, 25, data_parallel=8, spare=0.1) == 32
  assert estimate_lib.max_slots(1000, 950, 25, data_parallel=8, spare=0.1) == 0


def _decode_program(**kw):
  """A static loop compiled at 8 rows (4 per chip), 100 steps of 1.0 s HBM-bound, a row's 100
  bytes all KV cache, prompt chunk 6 then decode chunks (50, 50)."""
  base = dict(steps=100, rows=8, data_parallel=2, compute_s=0.1, hbm_s=1.0, ici_s=0.0, weight_bytes=1000.0,
              row_bytes=100.0, kv_row_bytes=100.0, prompt_len=6, chunk_lengths=(50, 50),
              kv_fill=estimate_lib.mean_visible_fraction(6, (50, 50)))
  return estimate_lib.DecodeProgram(**{**base, **kw})


def test_replays_give_each_steps_deepest_write_and_visible_chunks_by_hand():
  """3 or 4 rows on 2 slots, cache = prompt chunk 4 then decode chunks (2, 2, 4): window 12,
  chunk ends 4, 6, 8, 12."""
  chunks = (2, 2, 4)
  # Rows of 5, 2, 3 tokens: row 0 holds slot A for steps 0-4, row 1 slot B for 0-1, row 2 slot
  # B for 2-4. Row 0 writes offset t at step t: cache slots 4..8, in chunks 1, 1, 2, 2, 3.
  r = estimate_lib.continuous_replay(np.array([5, 2, 3]), slots=2)
  assert r.deepest.tolist() == [0, 1, 2, 3, 4] and r.refills.tolist() == [True, False, True, False, False]
  np.testing.assert_allclose(estimate_lib.visible_fraction(r.deepest, 4, chunks), [6 / 12, 6 / 12, 8 / 12, 8 / 12, 1])
  # Rows of 3, 1, 1, 2: row 0 on slot A for steps 0-2; rows 1, 2, 3 on slot B at steps 0, 1,
  # 2-3. At step 3 only row 3 runs, at its offset 1: back to chunks 0..1.
  r = estimate_lib.continuous_replay(np.array([3, 1, 1, 2]), slots=2)
  assert r.deepest.tolist() == [0, 1, 2, 1] and r.refills.tolist() == [True, True, True, False]
  np.testing.assert_allclose(estimate_lib.visible_fraction(r.deepest, 4, chunks), [6 / 12, 6 / 12, 8 / 12, 6 / 12])
  # Per data shard (2 shards, 1 slot each): shard 0 runs rows 5, 2 (starts 0, 5), shard 1 rows
  # 3, 1 (starts 0, 3); 7 steps, where one queue over both slots takes 6 (row 3 starts at 5).
  r = estimate_lib.continuous_replay(np.array([5, 2, 3, 1]), slots=2, shards=2)
  assert r.deepest.tolist() == [0, 1, 2, 3, 4, 0, 1]
  assert r.refills.tolist() == [True, False, False, True, False, True, False]
  assert estimate_lib.continuous_decode_steps(np.array([5, 2, 3, 1]), 2, shards=2) == 7
  assert estimate_lib.continuous_decode_steps(np.array([5, 2, 3, 1]), 2) == 6
  # A static call runs until its longest row is done, every row at offset t.
  assert estimate_lib.static_replay(np.array([3, 1, 1, 2])).deepest.tolist() == [0, 1, 2]
  # No row consuming (a slot waiting for its refill): the prompt chunk alone.
  assert estimate_lib.visible_fraction(np.array([-1]), 4, chunks).tolist() == [4 / 12]
  # The static loop at the budget (8 steps): 2 steps see 6, 2 see 8, 4 see 12 of 12.
  assert estimate_lib.mean_visible_fraction(4, chunks) == pytest.approx((2 * 6 + 2 * 8 + 4 * 12) / (8 * 12))
  # 1024 rows of up to 8192 tokens on 256 slots replay fast.
  import time
  rows = np.random.default_rng(0).integers(1, 8193, size=1024)
  start = time.perf_counter()
  r = estimate_lib.continuous_replay(rows, 256)
  assert time.perf_counter() - start < 1.0 and r.steps == estimate_lib.continuous_decode_steps(rows, 256)


def test_a_decode_step_reads_the_weights_and_each_rows_cache_up_to_the_deepest_chunk():
  """The second schedule above (3, 1, 1, 2 on 2 slots, chunk ends 4, 6, 8, 12), scaled from a
  static loop compiled at 8 rows (4 per chip) over the budget of 8 steps: a row 120 bytes, 96 of
  them KV cache, weights 1000 bytes; the compiled steps read 19/24 of the cache on average
  (1000 + 4 x (96 x 19/24 + 24) = 1400 bytes), 0.014 s each (1e-5 s per byte)."""
  d = estimate_lib.DecodeProgram(steps=8, rows=8, data_parallel=2, compute_s=0.0, hbm_s=8 * 0.014, ici_s=0.0,
                                 weight_bytes=1000.0, row_bytes=120.0, kv_row_bytes=96.0, prompt_len=4,
                                 chunk_lengths=(2, 2, 4), kv_fill=19 / 24)
  assert d.kv_fill == pytest.approx(estimate_lib.mean_visible_fraction(4, (2, 2, 4)))
  r = estimate_lib.continuous_replay(np.array([3, 1, 1, 2]), slots=2)
  # 4 slots (2 per chip): 1000 + 2 x (96 x 1/2 + 24) = 1144 bytes at fraction 1/2, 1176 at 2/3.
  assert estimate_lib.decode_seconds(d, 4, r) == pytest.approx(1e-5 * (3 * 1144 + 1176))
  # The static loop at its own rows over the budget is the compiled loop.
  assert estimate_lib.decode_seconds(d, 8, estimate_lib.static_replay(np.array([8]))) == pytest.approx(8 * 0.014)
  # A refill (0.001 s at 8 slots) in the steps where free slots take rows (steps 0, 1, 2).
  refilling = dataclasses.replace(d, refill_hbm_s=0.001)
  assert estimate_lib.decode_seconds(refilling, 4, r) == pytest.approx(1e-5 * (3 * 1144 + 1176) + 3 * 0.0005)
  # Compute-bound: per-row work scales with the slots, whatever the chunks.
  busy = dataclasses.replace(d, compute_s=8.0)
  assert estimate_lib.decode_seconds(busy, 4, r) == pytest.approx(4 * 0.5)


def test_replay_counts_each_shards_running_rows_and_their_own_keys_by_hand():
  """Rows of 3, 1, 4, 2, 5 tokens on 2 slots: row 0 runs steps 0-2, row 1 step 0, row 2 steps 1-4,
  row 3 steps 3-4, row 4 steps 5-9; a row adds offset + 1 keys (its decode tokens so far)."""
  r = estimate_lib.continuous_replay(np.array([3, 1, 4, 2, 5]), slots=2)
  assert r.running.tolist() == [[2, 2, 2, 2, 2, 1, 1, 1, 1, 1]]
  # t=1: row 0 at offset 1 (2 keys) + row 2 at 0 (1); t=4: row 2 at 3 (4) + row 3 at 1 (2).
  assert r.decode_keys.tolist() == [[2, 3, 5, 4, 6, 1, 2, 3, 4, 5]]
  # 2 shards of 1 slot: rows 3, 1, 4 (shard 0) and 2, 5 (shard 1), each replayed alone.
  r = estimate_lib.continuous_replay(np.array([3, 1, 4, 2, 5]), slots=2, shards=2)
  assert r.running.tolist() == [[1] * 8, [1] * 7 + [0]]
  assert r.decode_keys.tolist() == [[1, 2, 3, 1, 1, 2, 3, 4], [1, 2, 1, 2, 3, 4, 5, 0]]


def test_a_ragged_decode_step_reads_each_slots_own_prefix():
  """The program of the test above, compiled as continuous with every chunk visible (fill 1:
  1000 + 4 x 120 = 1480 bytes a step, 1e-5 s per byte), its attention the per-slot kernel:
  a step reads the weights, and per running slot its prompt chunk (4 of the 12-slot window) and
  its own decode keys, at 96 / 12 = 8 KV bytes per key plus 24 of other state; the step waits
  for the shard that reads the most."""
  d = estimate_lib.DecodeProgram(steps=8, rows=8, data_parallel=2, compute_s=0.0, hbm_s=8 * 0.0148, ici_s=0.0,
                                 weight_bytes=1000.0, row_bytes=120.0, kv_row_bytes=96.0, prompt_len=4,
                                 chunk_lengths=(2, 2, 4), kv_fill=1.0, continuous=True, ragged=True)
  r = estimate_lib.continuous_replay(np.array([3, 1, 4, 2, 5]), slots=2, shards=2)
  # Shard 0 at step 0: one row, 4 + 1 keys -> 1000 + 24 + 5 x 8 = 1064; shard 1 the same.
  keys = np.maximum(np.array([4 + 1, 4 + 2, 4 + 3, 4 + 1, 4 + 1, 4 + 2, 4 + 3, 4 + 4]),
                    np.array([4 + 1, 4 + 2, 4 + 1, 4 + 2, 4 + 3, 4 + 4, 4 + 5, 0]))
  assert estimate_lib.decode_seconds(d, 2, r) == pytest.approx(1e-5 * np.sum(1000 + 24 + 8 * keys))
  # The same program without the kernel reads every slot's cache up to the deepest chunk.
  chunked = dataclasses.replace(d, ragged=False)
  fill = estimate_lib.visible_fraction(r.deepest, 4, (2, 2, 4))
  assert estimate_lib.decode_seconds(chunked, 2, r) == pytest.approx(1e-5 * np.sum(1000 + 1 * (96 * fill + 24)))
  assert estimate_lib.decode_seconds(d, 2, r) < estimate_lib.decode_seconds(chunked, 2, r)


def test_expected_step_at_the_budget_is_the_worst_case_and_real_lengths_cost_less():
  shape = estimate_lib.StepShape(rows=16, rows_per_call=8, prompt_tokens=6, seq_len=6 + 100 + 1, update_shards=2,
                                 num_params=1000, logprob_forwards=1, peak_flops=1e6)
  d = _decode_program()
  worst = dict(prefill_s=0.5, logprobs_s=2.0, update_s=4.0)
  at_budget = estimate_lib.expected_step(shape, np.full(16, 100), d, slots=0, micro_batch_tokens=0, **worst)
  # Two static calls at the budget replay the compiled loop's chunks: its 1.0 s each.
  assert at_budget["decode_steps"] == 2 * 100 and at_budget["decode_s"] == pytest.approx(2 * 1.0)
  assert at_budget["rollout_s"] == pytest.approx(0.5 + 2.0 + 2.0) and at_budget["update_s"] == 4.0
  short = np.array([100] + [10] * 15)
  e = estimate_lib.expected_step(shape, short, d, slots=8, micro_batch_tokens=107, **worst)
  # As many slots as a call has rows: nothing to refill, the static steps reading the same chunks.
  assert e["static_decode_steps"] == e["decode_steps"] == 100 + 10
  assert e["decode_s"] == pytest.approx(e["static_decode_s"])
  # The second call's 10 steps read only chunks 0..1 (56 of 106 slots): less than 10 steps of the
  # compiled loop's average.
  assert e["static_decode_s"] < 1.0 + 10 * 0.01
  # One call of all 16 rows: the 15 short rows share 7 slots while the long one runs; the long
  # row is the deepest at every step, as in a static call at the budget: the compiled 1.0 s.
  one_call = estimate_lib.expected_step(dataclasses.replace(shape, rows_per_call=16), short, d, slots=8,
                                        micro_batch_tokens=107, **worst)
  assert one_call["decode_steps"] == estimate_lib.continuous_decode_steps(short, 8) == 100
  assert one_call["decode_s"] == pytest.approx(1.0)
  # 106 + 15 x 16 tokens in rows of 107 on 2 shards: 106 | 6 x 16 | 6 x 16 | 3 x 16 -> 2 micro-batches.
  assert e["packed_tokens"] == 2 * 2 * 107 and e["update_s"] == pytest.approx(4.0 * 428 / (16 * 107))
  assert e["useful_tokens"] == 106 + 15 * 16
  assert e["update_useful_mfu"] == pytest.approx(6 * 1000 * e["useful_tokens"] / (e["update_s"] * 1e6))


def test_expected_step_from_a_compiled_continuous_loop_scales_its_slot_step():
  """The report compiled the continuous programs: the decode figures are the 4 slots' (counted
  with every chunk visible, fill 1), 100 steps of 1.0 s HBM-bound; a call has 8 rows."""
  shape = estimate_lib.StepShape(rows=8, rows_per_call=8, prompt_tokens=6, seq_len=107, update_shards=2,
                                 num_params=1000, logprob_forwards=1, peak_flops=1e6)
  d = _decode_program(rows=4, kv_fill=1.0, call_rows=8, continuous=True)
  lengths = np.array([50, 10, 10, 10, 10, 10, 10, 10])
  e = estimate_lib.expected_step(shape, lengths, d, slots=4, micro_batch_tokens=0, prefill_s=0.0,
                                 logprobs_s=0.0, update_s=1.0)
  # Row 0 runs steps 0-49, the deepest, at offsets 0..49: cache slots 6..55, chunks 0..1 (56 of
  # 106) at every step. 2 slots per chip: 1000 + 2 x 100 x 56/106 bytes against the compiled
  # 1000 + 2 x 100, 0.01 s.
  assert e["decode_steps"] == 50
  assert e["decode_s"] == pytest.approx(50 * 0.01 * (1000 + 200 * 56 / 106) / 1200)
  # The static call of 8 rows runs 50 steps of 8 rows (4 per chip) reading the same chunks.
  assert e["static_decode_steps"] == 50
  assert e["static_decode_s"] == pytest.approx(50 * 0.01 * (1000 + 400 * 56 / 106) / 1200)


_SWITCH_BYTES = 1024 * 256 * 4  # the costliest branch reads all of x


def test_hlo_costs_count_a_switchs_costliest_branch_and_a_cond_that_may_do_nothing_apart():
  """`lax.switch` over how much of x to read (the continuous decode step's chunks in use): the
  worst case reads all of x, whichever branch comes first. `lax.cond(p, work, identity)` (the
  continuous sampler's refill): not counted, its bytes (read y, write 2y) reported apart."""
  x = jnp.ones((1024, 256))
  def costs(fn, *args):
    return cost_model.hlo_costs(jax.jit(fn).lower(*args).compile().as_text())
  branches = [lambda x: x[:8].sum(), lambda x: x[:64].sum(), lambda x: x.sum()]
  for order in (branches, branches[::-1]):
    switch = costs(lambda i, x: jax.lax.switch(i, order, x), jnp.int32(0), x)
    assert _SWITCH_BYTES <= switch.hbm_bytes < _SWITCH_BYTES + 1024 and switch.optional_hbm_bytes == 0
  y = jnp.ones((512, 512))
  maybe = costs(lambda p, y: jax.lax.cond(p, lambda: y * 2.0, lambda: y), jnp.bool_(True), y)
  assert maybe.optional_hbm_bytes == 2 * 512 * 512 * 4
  # Counted as not taken: only what surrounds it (at most a copy of y in and out).
  assert maybe.hbm_bytes <= 2 * 512 * 512 * 4 + 1024
  # XLA may leave a small op in the idle branch (here a convert of a [48] flag, as in the compiled
  # refill): the cond is still work taken only when needed, not counted at every call.
  flag = jnp.zeros((48,), jnp.int32)
  maybe = costs(lambda p, y, f: jax.lax.cond(p, lambda: (y * 2.0, (f + 1).astype(jnp.float32)),
                                             lambda: (y, f.astype(jnp.float32))), jnp.bool_(True), y, flag)
  assert maybe.optional_hbm_bytes >= 2 * 512 * 512 * 4
  assert maybe.hbm_bytes <= 2 * 512 * 512 * 4 + 1024


def test_config_validation_names_an_empty_response_lengths_key():
  from laser_jax import config_check
  c = default_config.get_config()
  c.aot.response_lengths = ""
  with pytest.raises(ConfigError, match=r"^config\.aot\.response_lengths: .*got ''$"):
    config_check.validate(c, num_devices=1)
