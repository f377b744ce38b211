"""The replay planner: replay tokens, buffer rows, candidates to score, compute budget.

The stage trains S = train.steps x global_batch_size x seq_len tokens. With the
configured weights w of the non-replay domains, T's share among them is q_T.
Replay fraction r (replay tokens / T tokens; `replay.fraction`) gives the
replay share p = r q_T / (1 + r q_T); a token count `replay.tokens` R > 0 gives
p = R / S instead. Costs (FLOPs): T = S (1-p) q_T f_train, replay = S p f_train,
teacher = (S (1-p)(1-q_T) when distilling + S p with replay_kd) x padding x f_fwd, selection =
candidates x L x f_fwd x (forwards per candidate) + fixed (look-ahead) [+ online refreshes;
`steered` refreshes cost none]. padding (`teacher_padding`) is the teacher's slots run per
teacher row: every device runs it on the fullest row block's count, rounded up to a power
of two (train/step.py `distill_index`), as the loop counts them. The selection cap
(`replay.selection_fraction`) is a share of the stage without that padding, so a run
selects the same rows on any mesh; the hard caps (`max_tflops`, `max_seconds`) see it.
Seconds use a measured forward FLOP/s (training assumed to run at the same rate).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from cpt_jax import batch as batch_lib
from cpt_jax.train import step as step_lib


def teacher_padding(batch: int, share: float, grad_accum: int = 1, shards: int = 1,
                    draws: int = 512) -> float:
  """Expected teacher slots run per teacher row (>= 1) for a batch of `batch` rows, a
  `share` of them the teacher's, split into `grad_accum` microbatches of `shards` row
  blocks. Estimated over `draws` batches drawn as the mixer draws them (floor or ceil of
  batch x share teacher rows, at shuffled positions: data/mixer.py), each indexed as the
  step indexes it (`step.distill_index`: A x D x the fullest block's count rounded up to a
  power of two; a batch without teacher rows runs none). Deterministic (fixed seed)."""
  if share <= 0:
    return 1.0
  rng = np.random.default_rng(0)
  lo = int(math.floor(batch * share))
  frac = batch * share - lo
  slots = rows = 0
  for _ in range(draws):
    n = min(lo + int(rng.random() < frac), batch)
    if n == 0:
      continue
    roles = np.full(batch, batch_lib.NEW, np.int32)
    roles[rng.permutation(batch)[:n]] = batch_lib.DISTILL
    slots += step_lib.distill_index(roles, grad_accum, shards=shards).size
    rows += n
  return slots / rows if rows else 1.0


def plan(*, rcfg, steps: int, batch: int, seq_len: int, weights: Mapping[str, float],
         roles: Mapping[str, str], pool_sizes: Mapping[str, int], f_train: float,
         f_fwd: float, strategy, lambda_kd: float, flops_per_second: float,
         replay_kd: float = 0.0, grad_accum: int = 1, shards: int = 1) -> dict:
  """The plan dict (see module docstring); ValueError when the replay or the caps leave no T.
  grad_accum, shards: the step's microbatches and row blocks (the teacher's padding)."""
  S = float(steps) * batch * seq_len
  nonrep = {d: float(w) for d, w in weights.items() if roles[d] in ("new", "distill")}
  tot = sum(nonrep.values())
  q_t = sum(w for d, w in nonrep.items() if roles[d] == "new") / tot if tot > 0 else 1.0
  if rcfg.tokens > 0:
    p = float(rcfg.tokens) / S
    if p >= 1:
      raise ValueError(f"replay.tokens={rcfg.tokens:.0f} is not below the stage's "
                       f"{S:.0f} tokens (train.steps={steps} x global_batch_size={batch} x "
                       f"seq_len={seq_len})")
  else:
    r = float(rcfg.fraction)
    p = r * q_t / (1 + r * q_t)
  t_tokens = S * (1 - p) * q_t
  replay_tokens = S * p
  r = replay_tokens / max(t_tokens, 1.0)
  pool = int(sum(pool_sizes.values()))
  buffer_rows = min(int(math.ceil(replay_tokens / (seq_len * rcfg.epochs))), pool)
  teacher_tokens = S * (1 - p) * (1 - q_t) if lambda_kd > 0 else 0.0
  if replay_kd > 0:  # the teacher also runs on every replay row
    teacher_tokens += replay_tokens
  padding = teacher_padding(batch, teacher_tokens / S, grad_accum, shards)
  tf = 1e12
  cost = {"new": t_tokens * f_train / tf, "replay": replay_tokens * f_train / tf,
          "teacher": teacher_tokens * padding * f_fwd / tf}
  base = sum(cost.values())
  # The selection fraction's cap is taken of the rows' FLOPs (teacher unpadded), so the
  # mesh changes no selection; the hard caps below see the teacher as it runs.
  base_rows = base - cost["teacher"] + teacher_tokens * f_fwd / tf
  rate = float(flops_per_second) or float("nan")
  secs = lambda tflops: tflops * tf / rate
  if rcfg.max_tflops and cost["new"] > rcfg.max_tflops:
    raise ValueError(
        f"replay.max_tflops={rcfg.max_tflops:g} is below what T alone costs: "
        f"{cost['new']:.4g} TFLOPs ({t_tokens:.0f} T tokens of train.steps={steps} x "
        f"train.global_batch_size={batch} x data.seq_len={seq_len}, x "
        f"{f_train:.4g} training FLOPs/token); raise the budget or lower train.steps")
  if rcfg.max_tflops and base > rcfg.max_tflops:
    raise ValueError(
        f"replay.max_tflops={rcfg.max_tflops:g}: T ({cost['new']:.4g}) + replay "
        f"({cost['replay']:.4g}, {_amount(rcfg)}) + teacher "
        f"({cost['teacher']:.4g}) = {base:.4g} TFLOPs exceed it; lower {_amount(rcfg, False)}")
  if rcfg.max_seconds and secs(cost["new"]) > rcfg.max_seconds:
    raise ValueError(
        f"replay.max_seconds={rcfg.max_seconds:g} is below what T alone takes: "
        f"~{secs(cost['new']):.4g} s ({cost['new']:.4g} TFLOPs at a measured "
        f"{rate / tf:.4g} TFLOP/s); raise the budget or lower train.steps")
  if rcfg.max_seconds and secs(base) > rcfg.max_seconds:
    raise ValueError(
        f"replay.max_seconds={rcfg.max_seconds:g}: T + replay + teacher take ~{secs(base):.4g} s "
        f"({base:.4g} TFLOPs at {rate / tf:.4g} TFLOP/s); lower {_amount(rcfg, False)}")
  # Selection budget: the smaller of the fraction cap and what the hard caps leave.
  frac = float(rcfg.selection_fraction)
  sel_cap = frac / (1 - frac) * base_rows if frac < 1 else float("inf")
  if rcfg.max_tflops:
    sel_cap = min(sel_cap, rcfg.max_tflops - base)
  if rcfg.max_seconds and rate == rate:
    sel_cap = min(sel_cap, (rcfg.max_seconds - secs(base)) * rate / tf)
  per_cand = strategy.forwards_per_candidate * seq_len * f_fwd / tf
  fixed = strategy.fixed_flops(rcfg, batch, seq_len, f_train) / tf
  refreshes, online_pool, online_every, candidates = 0, 0, 0, 0
  if strategy.name == "online":
    once, per_buffer = online_buffer_passes(rcfg)
    refreshes, online_pool, online_every = _online_plan(rcfg, steps, buffer_rows,
                                                        sel_cap / (seq_len * f_fwd / tf))
    # Candidates under M and now; the buffer now ('loss') or under both ('kl').
    per_refresh_rows = 2 * online_pool + per_buffer * buffer_rows
    # 'loss': the buffer's M losses are scored once, only when some refresh will use them.
    rows_scored = once * buffer_rows + refreshes * per_refresh_rows if refreshes else 0
    sel_tflops = rows_scored * seq_len * f_fwd / tf
  elif strategy.name == "steered":  # refreshed from training's own losses: no forward
    online_every = int(rcfg.online_every)
    refreshes = (steps - 1) // online_every
    sel_tflops = 0.0
  elif per_cand > 0:
    fit = int(max(sel_cap - fixed, 0.0) / per_cand)
    candidates = min(pool, fit, int(rcfg.pool_rows) or pool)
    candidates = max(candidates, min(strategy.min_candidates(buffer_rows, rcfg), pool))
    sel_tflops = candidates * per_cand + fixed
  else:
    sel_tflops = 0.0
  cost["selection"] = sel_tflops
  total = sum(cost.values())
  warnings = []
  if strategy.name == "online" and refreshes < (steps - 1) // rcfg.online_every:
    warnings.append(f"the selection budget holds {refreshes} of the "
                    f"{(steps - 1) // rcfg.online_every} online refreshes (every "
                    f"{rcfg.online_every} steps) with at least online_swap x buffer rows "
                    f"candidates each; refreshing every {online_every or '-'} steps"
                    + ("" if refreshes else ": none, so the buffer stays the random one"))
  if sel_tflops > sel_cap * (1 + 1e-9) and sel_tflops > 0:
    warnings.append(f"selection needs {sel_tflops:.4g} TFLOPs to score the {buffer_rows} buffer "
                    f"rows' candidates once, above its cap of {sel_cap:.4g}")
  return {
      "strategy": strategy.name, "stage_tokens": S, "t_tokens": t_tokens,
      "replay_tokens": replay_tokens, "replay_fraction": r, "replay_share": p, "q_t": q_t,
      "buffer_rows": buffer_rows, "pool_rows": pool, "candidates": candidates,
      "teacher_padding": padding,
      "online_refreshes": refreshes, "online_pool": online_pool, "online_every": online_every,
      "tflops": cost, "total_tflops": total,
      "selection_share": sel_tflops / total if total else 0.0,
      "flops_per_second": flops_per_second,
      "seconds": {k: secs(v) for k, v in cost.items()} if rate == rate else {},
      "replay_tokens_max": ((rcfg.max_tflops - cost["new"] - cost["teacher"]) * tf / f_train
                            if rcfg.max_tflops else None),
      "warnings": warnings,
  }


def _amount(rcfg, value: bool = True) -> str:
  """The key that sets the replay amount ('replay.tokens' or 'replay.fraction'), =value."""
  key = "tokens" if rcfg.tokens > 0 else "fraction"
  return f"replay.{key}" + (f"={rcfg[key]:g}" if value else "")


def ramp_share(p: float, q: float, step: int, steps: int, every: int) -> float:
  """The replay share of the batch at `step` under `replay.ramp` q in [-1, 1].

  Piecewise constant over segments of `every` steps: p (1 + q (2 m / steps - 1)), m the
  middle (a + b) / 2 of the step's segment [a, b), so (1 - q) p at the start, (1 + q) p
  at the end, and the mean over the stage's `steps` steps is p (the same replay tokens).
  """
  if not q:
    return p
  a = step // every * every
  b = min(a + every, steps)
  return p * (1.0 + q * ((a + b) / steps - 1.0))


def replay_weights(plan_: dict, weights: Mapping[str, float], roles: Mapping[str, str],
                   buffer_rows: Mapping[str, int], share: float | None = None
                   ) -> dict[str, float]:
  """Mixture weights: non-replay domains keep relative weights (share 1-p), replay ones
  share p (the plan's, or `share`) in proportion to their buffer rows."""
  p = plan_["replay_share"] if share is None else share
  nonrep = {d: float(w) for d, w in weights.items() if roles[d] in ("new", "distill")}
  tot = sum(nonrep.values()) or 1.0
  out = {d: (1 - p) * w / tot for d, w in nonrep.items()}
  nb = sum(buffer_rows.values())
  for d, r in roles.items():
    if r == "replay":
      out[d] = p * buffer_rows.get(d, 0) / nb if nb else 0.0
  return out


def format_plan(p: dict) -> str:
  t = p["tflops"]
  s = p.get("seconds") or {}
  parts = [f"{k} {t[k]:.4g} TF" + (f" (~{s[k]:.0f}s)" if k in s else "") for k in t]
  return (f"replay plan [{p['strategy']}]: replay {p['replay_tokens']:.0f} tokens = "
          f"{p['replay_fraction']:.3g} x T's {p['t_tokens']:.0f} (mixture share "
          f"{p['replay_share']:.4f}); buffer {p['buffer_rows']} rows of a pool of "
          f"{p['pool_rows']}; candidates scored {p['candidates']}"
          + (f"; online {p['online_refreshes']} refreshes x {p['online_pool']} candidates"
             if p["online_refreshes"] else "")
          + f"; planned {', '.join(parts)}; total {p['total_tflops']:.4g} TF, selection "
          f"{100 * p['selection_share']:.2f}%"
          + ("".join(f"\n  warning: {w}" for w in p["warnings"])))


def online_buffer_passes(rcfg) -> tuple[int, int]:
  """Forwards per buffer row of `online` scoring: (once at the start, at every refresh).

  'loss' keeps the buffer's M losses (one forward each, once) and runs the model
  now at each refresh; 'kl' runs both models on the buffer at each refresh.
  """
  return (0, 2) if rcfg.get("online_score", "loss") == "kl" else (1, 1)


def _online_plan(rcfg, steps: int, buffer_rows: int, cap_rows: float) -> tuple[int, int, int]:
  """(refreshes, candidates per refresh, steps between refreshes) within cap_rows forwards.

  With b buffer rows and (once, per refresh) = online_buffer_passes: the start
  costs once x b, a refresh with n candidates 2 n + per refresh x b. Keeps the
  configured number of refreshes while the pool it leaves holds at least
  online_swap x buffer_rows candidates (a refresh could swap that many rows),
  else plans fewer, evenly spaced refreshes; none fit: 0.
  """
  wanted = (steps - 1) // rcfg.online_every  # none at the last step
  min_pool = max(1, math.ceil(float(rcfg.online_swap) * buffer_rows))
  once, per_buffer = online_buffer_passes(rcfg)
  avail = cap_rows - once * buffer_rows
  for k in range(wanted, 0, -1):
    pool = min(int(rcfg.online_pool), int((avail / k - per_buffer * buffer_rows) / 2))
    if pool >= min(min_pool, int(rcfg.online_pool)) and pool >= 1:
      every = rcfg.online_every if k == wanted else -(-steps // (k + 1))
      return (steps - 1) // every, pool, every
  return 0, 0, 0
