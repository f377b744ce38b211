r"""Train-step throughput and MFU, against a plain Flax step and a measured matmul peak,
and the step-time price of each CPT feature.

  python benchmarks/throughput.py                 # headline CPU shape (f32), features
  python benchmarks/throughput.py --no_baseline --no_features   # the headline alone
  python benchmarks/throughput.py --quick         # a tiny shape in seconds (smoke test)
  python benchmarks/throughput.py --gpt2_small    # d768 x 12 layers, seq 1024, bf16 (GPU)
  python benchmarks/throughput.py --llama_1b --attention cudnn --batch 4 --no_baseline \
      --peak_n 8192 --remat dots_no_batch --no_features --profile /tmp/trace
                                                  # Llama-3.2-1B shape, seq 4096 (GPU);
                                                  # gpu_session.sh runs it, then the same
                                                  # with 25% distill rows and a teacher

Prints one JSON object: tokens_per_sec, model_tflops_per_step, peak_gflops (a
matmul in the compute dtype, measured before and after the step timings in this
same run; the higher is used), mfu, mfu_spec (against the chip's datasheet rate,
SPEC_BF16_TFLOPS, in bf16), with --profile the trace's summary (`profile`:
profile_summary.py's time per kind of op), the same figures for a plain Flax step of
the same shape (`baseline`), nanodo's own train step at the same shape
(`nanodo`, when it is installed; its MFU from its own model's FLOPs), the
machine's /proc/loadavg before and after, and `features`: step time with each
CPT feature over the plain step's, measured in one run with the variants taking
turns (`--feature_rounds` rounds of `--feature_steps` steps; medians), so a
change in load falls on all of them, beside the ratio of the compiled steps'
FLOPs (XLA's cost analysis):

  replay_5 / replay_25    1 of 16 / 4 of 16 rows are replay rows (CE); goal: 1.0
  distill_5 / distill_25  the same rows distilled from a teacher (lambda_kd = 1);
                          goal: 1 + share / 3 + 0.05 (a teacher forward is a third
                          of a training step)
  sigma_tau_routing       LoRA tau (rank 8 on attn q/v and the MLP) <- new rows,
                          sigma <- 4 replay rows of 16; goal: 1.15; beside it
                          lora_no_routing (both groups follow the whole loss)
                          and subtree_routing (full-shape deltas on the same
                          kernels, routed in the same backward)
  kd_topk                 at vocabularies of 32k and 128k (batch 4, one distill
                          row): full-vocabulary KD and top-64 KD over the plain
                          step at that vocabulary, and the temporary bytes of
                          the compiled steps (`memory_analysis`)
  controllers             seconds of one rate-controller update over 200 domains
                          as a fraction of the plain step (each controller)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from cpt_jax import batch as batch_lib  # pylint: disable=wrong-import-position
from cpt_jax import mixing  # pylint: disable=wrong-import-position
from cpt_jax.model.transformer import flops_per_token, ModelConfig  # pylint: disable=wrong-import-position
from cpt_jax.schema import mixing as mixing_config  # pylint: disable=wrong-import-position
from cpt_jax.train import metrics  # pylint: disable=wrong-import-position
import bench_lib as bench  # pylint: disable=wrong-import-position
import profile_summary  # pylint: disable=wrong-import-position

# Dense bf16 TFLOP/s per chip by the vendors' datasheets, by jax's device_kind (the first
# name contained in it); `mfu_spec` divides by it. --spec_tflops overrides.
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
                    ("TPU v6 lite", 918.0))


def spec_tflops(device_kind: str, dtype) -> float | None:
  """The datasheet's dense bf16 TFLOP/s of `device_kind` (None: unknown, or not bf16)."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    return None
  return next((v for k, v in SPEC_BF16_TFLOPS if k in device_kind), None)


NANODO_SKIPPED = {"skipped": "not installed: pip install git+https://github.com/google-deepmind/nanodo"}
LORA = dict(mode="lora", targets=r"(attn/(q|v)|mlp/(gate|up|down))/kernel", lora_rank=8,
            lora_alpha=16.0)


class PlainBlock(nn.Module):
  """Textbook Flax block of the same shape: RMSNorm, MHA with rotary, SwiGLU."""

  d: int
  heads: int
  mlp: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, pos):
    e = self.d // self.heads
    h = nn.RMSNorm(dtype=self.dtype)(x)
    q, k, v = (nn.DenseGeneral((self.heads, e), use_bias=False, dtype=self.dtype)(h)
               for _ in range(3))
    inv = 1.0 / (10000 ** (jnp.arange(0, e, 2) / e))
    ang = pos[..., None] * inv
    sin, cos = jnp.sin(jnp.concatenate([ang, ang], -1)), jnp.cos(jnp.concatenate([ang, ang], -1))
    rot = lambda t: t * cos[:, :, None] + jnp.concatenate(
        [-t[..., e // 2:], t[..., :e // 2]], -1) * sin[:, :, None]
    q, k = rot(q), rot(k)
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e)
    l = x.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((l, l), bool)), s, -1e30)
    a = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s.astype(jnp.float32), -1).astype(
        self.dtype), v)
    x = x + nn.DenseGeneral(self.d, axis=(-2, -1), use_bias=False, dtype=self.dtype)(a)
    h = nn.RMSNorm(dtype=self.dtype)(x)
    g = nn.Dense(self.mlp, use_bias=False, dtype=self.dtype)(h)
    u = nn.Dense(self.mlp, use_bias=False, dtype=self.dtype)(h)
    return x + nn.Dense(self.d, use_bias=False, dtype=self.dtype)(nn.silu(g) * u)


class PlainLM(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    x = nn.Embed(c.vocab_size, c.d_model, dtype=dt)(tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape).astype(jnp.float32)
    for _ in range(c.num_layers):
      x = PlainBlock(c.d_model, c.num_heads, c.mlp_dim, dt)(x, pos)
    return nn.Dense(c.vocab_size, use_bias=False, dtype=dt)(nn.RMSNorm(dtype=dt)(x))


def time_plain_step(model_cfg: ModelConfig, batch_size: int, seq_len: int, steps: int,
                    repeats: int) -> dict:
  """The plain baseline: PlainLM + optax.adamw + mean CE, one device, jit."""
  model = PlainLM(model_cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      1, model_cfg.vocab_size, (batch_size, seq_len)), jnp.int32)
  params = model.init(jax.random.key(0), tokens[:1])
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, tokens):
    def loss_fn(p):
      logits = model.apply(p, tokens).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  params, opt, loss = step(params, opt, tokens)
  jax.block_until_ready(loss)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      params, opt, loss = step(params, opt, tokens)
    jax.block_until_ready(loss)
    times.append((time.perf_counter() - t0) / steps)
  sec = float(np.median(times))
  return {"seconds_per_step": sec, "tokens_per_sec": batch_size * seq_len / sec}


def loadavg() -> list[float]:
  with open("/proc/loadavg", encoding="utf-8") as f:
    return [float(x) for x in f.read().split()[:3]]


def feature_configs(config) -> dict[str, tuple]:
  """{name: (config, roles [B])} of the features timed against `plain` at `config`'s shape."""
  b = config.train.global_batch_size

  def variant(**groups):
    c = copy.deepcopy(config)
    for group, values in groups.items():
      c[group].update(values)
    return c

  plain_roles = bench.roles_for(b, 0, batch_lib.NEW)
  out = {"plain": (config, plain_roles)}
  for pct in (5, 25):
    out[f"replay_{pct}"] = (config, bench.roles_for(b, pct / 100, batch_lib.REPLAY))
    out[f"distill_{pct}"] = (variant(objective=dict(lambda_kd=1.0)),
                             bench.roles_for(b, pct / 100, batch_lib.DISTILL))
  mixed = bench.roles_for(b, 0.25, batch_lib.REPLAY)
  out["sigma_tau_routing"] = (variant(decomposition=dict(LORA, routing=True)), mixed)
  out["lora_no_routing"] = (variant(decomposition=dict(LORA, routing=False)), mixed)
  # The same targets as full-shape subtree deltas (sigma frozen under them), routed.
  out["subtree_routing"] = (variant(decomposition=dict(mode="subtree", targets=LORA["targets"],
                                                       routing=True)), mixed)
  return out


def topk_configs(config, vocab: int, k: int = 64) -> dict[str, tuple]:
  """Plain, full-vocabulary KD and top-k KD at `vocab`: batch 4, one distill row."""
  c = copy.deepcopy(config)
  c.model.vocab_size = vocab
  c.train.global_batch_size = 4
  kd = copy.deepcopy(c)
  kd.objective.lambda_kd = 1.0
  top = copy.deepcopy(kd)
  top.objective.kd_topk = k
  roles = bench.roles_for(4, 0.25, batch_lib.DISTILL)
  return {"plain": (c, bench.roles_for(4, 0, batch_lib.NEW)), "kd_full": (kd, roles),
          f"kd_top{k}": (top, roles)}


def timed_ratios(variants: dict[str, tuple], steps: int, rounds: int,
                 memory: bool = False) -> dict:
  """Median seconds per step of each variant (interleaved) and its ratio to `plain` (and
  the ratio of the compiled steps' FLOPs by XLA's cost analysis, which load cannot move); with
  `memory` the compiled step's per-device bytes (`bench_lib.memory_bytes`)."""
  benches = {k: bench.build_bench(c, roles) for k, (c, roles) in variants.items()}
  times = bench.interleaved_times(benches, steps, rounds)
  plain = float(np.median(times["plain"]))
  plain_flops = benches["plain"].hlo_flops()
  out = {}
  for k, t in times.items():
    roles = np.asarray(benches[k].batch["roles"])
    out[k] = {"seconds_per_step": float(np.median(t)), "ratio": float(np.median(t)) / plain,
              "hlo_flops_ratio": benches[k].hlo_flops() / plain_flops,
              "rows": {batch_lib.ROLES[r]: int(np.sum(roles == r)) for r in np.unique(roles)}}
    if memory:
      mem = benches[k].memory()
      out[k].update(temp_bytes=mem["temp_bytes"], peak_bytes=mem["peak_bytes"])
  return out


def features(config, steps: int, rounds: int, vocabs=(32768, 131072),
             only: tuple[str, ...] = ()) -> dict:
  """The `features` section of the JSON (see the module docstring); `only`: these rows of
  `feature_configs` (with `plain`), e.g. to fit a large model's states in memory."""
  load0 = loadavg()
  variants = feature_configs(config)
  if only:
    unknown = set(only) - set(variants)
    if unknown:
      raise SystemExit(f"--features: unknown {sorted(unknown)}; expected some of {list(variants)}")
    variants = {k: v for k, v in variants.items() if k == "plain" or k in only}
  res = timed_ratios(variants, steps, rounds)
  b = config.train.global_batch_size
  for name, r in res.items():
    if name.startswith("replay_"):
      r["goal"] = 1.0
    elif name.startswith("distill_"):
      share = r["rows"]["distill"] / b
      r["goal"] = 1 + share / 3 + 0.05
    elif name == "sigma_tau_routing":
      r["goal"] = 1.15
    if "goal" in r:
      # replay: "no cost per token": within 5% of the plain step (timing noise)
      slack = 1.05 if name.startswith("replay_") else 1.0
      r["meets_goal"] = r["ratio"] <= r["goal"] * slack
  topk = {}
  for vocab in vocabs:
    row = timed_ratios(topk_configs(config, vocab), max(1, steps // 2), rounds, memory=True)
    top = [k for k in row if k.startswith("kd_top")][0]
    row["temp_bytes_saved_vs_full_kd"] = row["kd_full"]["temp_bytes"] - row[top]["temp_bytes"]
    topk[f"vocab_{vocab}"] = row
  res["kd_topk"] = topk
  plain_s = res["plain"]["seconds_per_step"]
  ctl = {}
  for name in mixing_config.CONTROLLERS:
    mcfg = mixing_config.default_mixing_config()
    mcfg.controller = name
    sec = mixing.controller_overhead_seconds(mcfg, num_domains=200)
    ctl[name] = {"seconds_per_update": sec, "fraction_of_step": sec / plain_s}
  res["controllers_200_domains"] = ctl
  res["timing"] = {"steps_per_round": steps, "rounds": rounds, "loadavg_before": load0,
                   "loadavg_after": loadavg()}
  return res


def time_nanodo(model_cfg: ModelConfig, batch_size: int, seq_len: int, steps: int,
                repeats: int) -> dict:
  """nanodo's own `Trainer` (train.py: its state init, jitted step and optimizer) on random
  tokens at this shape, one device; model FLOPs as ours count them."""
  nd_train = importlib.import_module("nanodo.train")
  nd_factory = importlib.import_module("nanodo.model_factory")
  nd_default = importlib.import_module("nanodo.configs.default")
  c = nd_default.get_config()
  c.batch_size = batch_size
  c.model.update(D=model_cfg.d_model, H=model_cfg.num_heads, L=seq_len,
                 N=model_cfg.num_layers, F=model_cfg.mlp_dim, dtype=model_cfg.dtype,
                 fsdp_enabled=False, remat=False)
  c.log_internal_metrics = False
  model, get_loss_fn = nd_factory.get_model_and_loss(c, model_cfg.vocab_size)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  shardings, state = nd_train._init_train_state(  # pylint: disable=protected-access
      c, model, rng=jax.random.key(c.seed), mesh=mesh)
  trainer = nd_train.Trainer(c=c, state=state, mesh=mesh, shardings=shardings,
                             get_loss_fn=get_loss_fn)
  rng = np.random.default_rng(0)
  # The step donates its tokens: a fresh array per step, made before the clock starts.
  def batches(n):
    return [jnp.asarray(rng.integers(1, model_cfg.vocab_size, (batch_size, seq_len)),
                        jnp.int32) for _ in range(n)]
  # do_step(0) first runs nanodo's one-off cost bookkeeping (metrics.get_init_metrics:
  # XLA cost analysis of its step, outside the step), which reads cost_analysis() as a
  # list and fails on JAX releases that return a dict. The step itself does not use it:
  # marked done, the timed steps are nanodo's jitted step as its train loop runs it.
  trainer.init_metrics = {}
  jax.block_until_ready(trainer.do_step(1, batches(1)[0]))
  times, step = [], 2
  for _ in range(repeats):
    tokens = batches(steps)
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for t in tokens:
      m = trainer.do_step(step, t)
      step += 1
    jax.block_until_ready((trainer.state, m))
    times.append((time.perf_counter() - t0) / steps)
  sec = float(np.median(times))
  return {"seconds_per_step": sec, "tokens_per_sec": batch_size * seq_len / sec}


def nanodo_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of nanodo's model at this shape, counted as
  `flops_per_token` counts ours: its MLP is GELU with two matrices (ours: SwiGLU, three),
  q / k / v / out are D x D, the logits use the tied embedding (D x V)."""
  d, f, n = model_cfg.d_model, model_cfg.mlp_dim, model_cfg.num_layers
  matmul = n * (4 * d * d + 2 * d * f) + d * model_cfg.vocab_size
  return 3 * (2 * matmul + 4 * n * seq_len * d)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="a tiny shape, one round, vocabulary 1024 for top-k (the smoke test)")
  ap.add_argument("--gpt2_small", action="store_true", help="d768 x 12, seq 1024, bf16")
  ap.add_argument("--llama_1b", action="store_true",
                  help="Llama-3.2-1B shape (d2048 x 16, 32/8 heads, MLP 8192, vocab 128,256), "
                       "seq 4096, bf16, remat full")
  ap.add_argument("--remat", default="", help="model.remat (transformer.REMAT_POLICIES)")
  ap.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batch", type=int, default=0, help="override the batch size")
  ap.add_argument("--no_baseline", action="store_true")
  ap.add_argument("--no_features", action="store_true", help="skip the `features` section")
  ap.add_argument("--features", default="",
                  help="comma-separated feature rows to time (default all), e.g. distill_25")
  ap.add_argument("--feature_steps", type=int, default=3, help="steps per feature per round")
  ap.add_argument("--feature_rounds", type=int, default=7)
  ap.add_argument("--topk_vocabs", default="32768,131072",
                  help="comma-separated vocabularies of the top-k KD rows ('' skips them)")
  ap.add_argument("--nanodo", choices=("auto", "yes", "no"), default="auto",
                  help="nanodo's Trainer at the same shape (auto: when importable)")
  ap.add_argument("--profile", default="",
                  help="folder: a jax.profiler trace of two headline steps (after the timing)")
  ap.add_argument("--attention", default="", help="model.attention (native, dot_product, cudnn)")
  ap.add_argument("--spec_tflops", type=float, default=0.0,
                  help="the chip's specified dense TFLOP/s in the compute dtype for "
                       "`mfu_spec` (default: SPEC_BF16_TFLOPS by device kind)")
  ap.add_argument("--peak_n", type=int, default=0,
                  help="matmul size of the peak (default 2048 on CPU, 8192 elsewhere)")
  args = ap.parse_args()

  load0 = loadavg()
  config = bench.throughput_config()
  if args.gpt2_small:
    config.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                        mlp_dim=3072, dtype="bfloat16", vocab_pad_multiple=128)
    config.data.seq_len = 1024
    config.train.global_batch_size = 16
  if args.llama_1b:
    config.model.update(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                        mlp_dim=8192, vocab_size=128256, tie_embeddings=True,
                        rope_theta=500000.0, dtype="bfloat16", remat="full")
    config.data.seq_len = 4096
    config.train.global_batch_size = 8
  if args.quick:
    config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128)
    config.data.seq_len = 32
    args.steps, args.repeats, args.feature_steps, args.feature_rounds = 1, 1, 1, 2
    args.topk_vocabs, args.peak_n = "1024", args.peak_n or 256
  if args.batch:
    config.train.global_batch_size = args.batch
  if args.attention:
    config.model.attention = args.attention
  if args.remat:
    config.model.remat = args.remat
  dtype = jnp.dtype(config.model.dtype)
  # An accelerator needs a larger product than 2048^3 to reach its peak.
  peak_n = args.peak_n or (2048 if jax.default_backend() == "cpu" else 8192)
  peak_before = metrics.measure_matmul_peak(n=peak_n, dtype=dtype)
  ours = bench.time_train_step(config, steps=args.steps, repeats=args.repeats,
                               trace_dir=args.profile)
  model_cfg = ModelConfig.from_config(config.model)
  seq, bsz = config.data.seq_len, config.train.global_batch_size
  base = None if args.no_baseline else time_plain_step(model_cfg, bsz, seq, args.steps,
                                                       args.repeats)
  nanodo_found = importlib.util.find_spec("nanodo") is not None
  if args.nanodo == "yes" and not nanodo_found:
    raise SystemExit("--nanodo=yes: " + NANODO_SKIPPED["skipped"])
  nanodo = None
  if args.nanodo != "no" and nanodo_found:
    nanodo = time_nanodo(model_cfg, bsz, seq, args.steps, args.repeats)
  peak_after = metrics.measure_matmul_peak(n=peak_n, dtype=dtype)
  peak = max(peak_before, peak_after)
  flops_step = flops_per_token(model_cfg, seq) * bsz * seq

  out = {
      "device": jax.devices()[0].device_kind, "dtype": str(dtype),
      "attention": model_cfg.attention, "remat": model_cfg.remat,
      "shape": {"d_model": model_cfg.d_model, "layers": model_cfg.num_layers,
                "heads": model_cfg.num_heads, "kv_heads": model_cfg.num_kv_heads,
                "mlp": model_cfg.mlp_dim, "seq": seq, "batch": bsz,
                "vocab": model_cfg.vocab_size},
      "tokens_per_sec": ours["tokens_per_sec"],
      "seconds_per_step": ours["seconds_per_step"],
      "step_times": ours["step_times"],
      "compile_seconds": ours["compile_seconds"],
      "model_tflops_per_step": flops_step / 1e12,
      "peak_gflops": peak / 1e9, "peak_matmul_n": peak_n,
      "peak_gflops_before_after": [peak_before / 1e9, peak_after / 1e9],
      "mfu": flops_step / ours["seconds_per_step"] / peak,
  }
  spec = args.spec_tflops or spec_tflops(out["device"], dtype)
  out["spec_tflops"] = spec
  out["mfu_spec"] = flops_step / ours["seconds_per_step"] / (spec * 1e12) if spec else None
  if args.profile:
    out["profile"] = profile_summary.summarize(args.profile)
  if base is not None:
    out["baseline"] = {"tokens_per_sec": base["tokens_per_sec"],
                       "mfu": flops_step / base["seconds_per_step"] / peak}
    out["speedup_vs_baseline"] = ours["tokens_per_sec"] / base["tokens_per_sec"]
  if args.nanodo != "no":
    # nanodo's model does less work a token (a two-matrix MLP): MFU from its own FLOPs.
    nd_flops_step = nanodo_flops_per_token(model_cfg, seq) * bsz * seq
    out["nanodo"] = NANODO_SKIPPED if nanodo is None else {
        "tokens_per_sec": nanodo["tokens_per_sec"],
        "model_tflops_per_step": nd_flops_step / 1e12,
        "mfu": nd_flops_step / nanodo["seconds_per_step"] / peak,
        "tokens_per_sec_ratio": ours["tokens_per_sec"] / nanodo["tokens_per_sec"],
        "mfu_ratio": (flops_step / ours["seconds_per_step"])
                     / (nd_flops_step / nanodo["seconds_per_step"])}
  out["loadavg_before_after_headline"] = [load0, loadavg()]
  if not args.no_features:
    vocabs = tuple(int(v) for v in args.topk_vocabs.split(",") if v)
    only = tuple(f for f in args.features.split(",") if f)
    out["features"] = features(config, args.feature_steps, args.feature_rounds, vocabs, only)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
