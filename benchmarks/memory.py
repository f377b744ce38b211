r"""Memory per device of a Llama-3.2-1B-shaped train step, from shapes alone (no weights).

  python benchmarks/memory.py                    # d2048 x 16 layers, vocab 128,256, seq 4096
  python benchmarks/memory.py --seq 2048 --remat full,dots
  python benchmarks/memory.py --model llama3.2-3b --remat full --devices 1
  python benchmarks/memory.py --quick            # a tiny shape (the smoke test)

For each remat policy (`model.remat`), on one device and on an 8-device FSDP mesh
(mesh (1, 8, 1), 8 forced CPU devices), the train step is lowered and compiled
with abstract inputs (`jax.jit(...).lower(ShapeDtypeStructs with shardings)`):
parameter and optimizer-state bytes per device come from the state's shardings,
temporaries and the peak from XLA's `memory_analysis()`. Each figure is given for
a plain CPT step and for a KD step (a frozen teacher, `objective.lambda_kd`, whose
forward runs on the batch's distill rows). Per-device batch 1; bf16 compute with
float32 parameters and AdamW state, as the recipes run.

Prints one JSON object; `fsdp8_state_bytes_per_device_ratio` is (parameter +
optimizer-state bytes per device on 8 devices) / (the same on 1 device), goal <=
1/8 + 10% = 0.1375; `kd_teacher` gives the teacher's bytes per device against its
parameter bytes / FSDP size (goal: no more, and no optimizer state), and
`kd_extra_temp_bytes_per_device` what the KD step adds to the temporaries (goal:
no more per device on 8 devices than on one: the teacher's rows are gathered on
the device that holds them, `objective.take_rows`).

Temporaries are those of the CPU compile, whose attention ('native') materialises
each layer's [H, L, L] scores; cuDNN's fused attention on GPU does not, so on GPU
these temporaries are an upper bound. Layers are scanned (`model.scan_layers`): with
unrolled layers the CPU compiler schedules every layer's recomputation early, so
the temporaries come out the same for every remat policy (`--unrolled` shows it);
the GPU and TPU schedulers are memory-aware.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# 8 CPU devices for the FSDP mesh: the flag must be set before JAX initialises.
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import jax  # pylint: disable=wrong-import-position

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from cpt_jax import batch as batch_lib  # pylint: disable=wrong-import-position
from cpt_jax import config as config_lib  # pylint: disable=wrong-import-position
from cpt_jax.model.transformer import REMAT_POLICIES  # pylint: disable=wrong-import-position
import bench_lib as bench  # pylint: disable=wrong-import-position

FSDP = 8
GIB = 2 ** 30
# Shapes from the models' Hugging Face config.json files.
LLAMA_1B = dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                vocab_size=128256, tie_embeddings=True, rope_theta=500000.0)
MODELS = {
    "llama3.2-1b": LLAMA_1B,
    "qwen2.5-0.5b": dict(d_model=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         mlp_dim=4864, vocab_size=151936, tie_embeddings=True, qkv_bias=True,
                         rope_theta=1000000.0),
    "llama3.2-3b": dict(d_model=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                        mlp_dim=8192, vocab_size=128256, tie_embeddings=True,
                        rope_theta=500000.0),
    "llama3.1-8b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        mlp_dim=14336, vocab_size=128256, rope_theta=500000.0),
    "quick": dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256,
                  vocab_size=512, tie_embeddings=True),
}


def stage_config(shape: dict, seq: int, remat: str, devices: int, kd: bool,
                 scan: bool = True) -> config_lib.ml_collections.ConfigDict:
  """A CPT step of `shape`: bf16 compute, f32 params + AdamW, FSDP over `devices`, per-device
  batch 1, layers scanned (`scan`); with `kd` a teacher (objective.lambda_kd = 1)."""
  c = config_lib.default_config()
  c.model.update(dtype="bfloat16", remat=remat, attention="native", scan_layers=scan, **shape)
  c.data.update(seq_len=seq, new="synthetic")
  c.train.global_batch_size = devices
  c.sharding.mesh_shape = (1, -1, 1)
  if kd:
    c.objective.lambda_kd = 1.0
  return c


def measure(shape: dict, seq: int, remat: str, devices: int, kd: bool,
            scan: bool = True) -> dict:
  """Per-device bytes of one compiled step (KD: half the rows, at least one, distilled)."""
  c = stage_config(shape, seq, remat, devices, kd, scan)
  roles = bench.roles_for(devices, 0.5 if kd else 0.0, batch_lib.DISTILL)
  return bench.compiled_step_memory(c, roles, jax.devices()[:devices])


def summarise(runs: dict) -> dict:
  """The ratios the goals are stated in, from `runs[(remat, devices, kd)]`."""
  def state(r):
    return r["param_bytes"] + r["opt_state_bytes"]
  out = {}
  any_remat = next(iter(runs))[0]
  one, eight = runs[(any_remat, 1, False)], runs[(any_remat, FSDP, False)]
  out["fsdp8_state_bytes_per_device_ratio"] = state(eight) / state(one)
  kd1, kd8 = runs[(any_remat, 1, True)], runs[(any_remat, FSDP, True)]
  out["kd_teacher"] = {
      "teacher_bytes_per_device_1": kd1["frozen_bytes"]["teacher"],
      "teacher_bytes_per_device_fsdp8": kd8["frozen_bytes"]["teacher"],
      "param_bytes_over_fsdp8": one["param_bytes"] / FSDP,
      "teacher_over_param_bytes_per_fsdp8": kd8["frozen_bytes"]["teacher"] /
                                            (one["param_bytes"] / FSDP),
      "extra_opt_state_bytes_fsdp8": kd8["opt_state_bytes"] - eight["opt_state_bytes"],
      "extra_argument_bytes_fsdp8": kd8["argument_bytes"] - eight["argument_bytes"],
  }
  # What the KD step adds to the temporaries per device, per remat policy and mesh size;
  # goal: the 8-device figure no larger than the 1-device one (same rows per device).
  out["kd_extra_temp_bytes_per_device"] = {
      remat: {str(d): runs[(remat, d, True)]["temp_bytes"] - runs[(remat, d, False)]["temp_bytes"]
              for d in (1, FSDP)}
      for remat in dict.fromkeys(k[0] for k in runs)}
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="a tiny shape, seq 64 (smoke test)")
  ap.add_argument("--model", default="llama3.2-1b", choices=sorted(MODELS),
                  help="the shape (default Llama 3.2 1B)")
  ap.add_argument("--seq", type=int, default=4096, help="sequence length")
  # dots_no_batch_attention differs from dots_no_batch only with cuDNN attention, which
  # does not compile here: not among the defaults.
  ap.add_argument("--remat", default=",".join(p for p in REMAT_POLICIES
                                              if p != "dots_no_batch_attention"),
                  help="comma-separated model.remat policies")
  ap.add_argument("--devices", default=f"1,{FSDP}", help="comma-separated mesh sizes")
  ap.add_argument("--unrolled", action="store_true",
                  help="model.scan_layers=False (on CPU remat then saves nothing: see above)")
  args = ap.parse_args()
  shape = MODELS["quick" if args.quick else args.model]
  seq = 64 if args.quick else args.seq
  remats = [r for r in args.remat.split(",") if r]
  sizes = [int(d) for d in args.devices.split(",")]
  with open("/proc/loadavg", encoding="utf-8") as f:
    load = f.read().split()[:3]
  runs = {}
  for remat in remats:
    for devices in sizes:
      for kd in (False, True):
        runs[(remat, devices, kd)] = r = measure(shape, seq, remat, devices, kd,
                                                 not args.unrolled)
        print(f"remat={remat} devices={devices} kd={kd}: temp {r['temp_bytes'] / GIB:.2f} GiB, "
              f"peak {r['peak_bytes'] / GIB:.2f} GiB ({r['compile_seconds']:.0f} s compile)",
              file=sys.stderr)
  out = {"model": "quick" if args.quick else args.model, "shape": {**shape, "seq": seq, "batch_per_device": 1, "dtype": "bfloat16",
                   "scan_layers": not args.unrolled,
                   "params": "float32 + AdamW (float32 moments)"},
         "backend": jax.default_backend(), "loadavg": load}
  if {1, FSDP} <= set(sizes):
    out.update(summarise(runs))
  out["runs"] = [{"remat": k[0], "kd": k[2], **v} for k, v in runs.items()]
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
