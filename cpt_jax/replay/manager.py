"""Replay selection for a stage: plan, select (fresh start), reuse (resume), refresh (online).

  manager = ReplayManager(config, pipeline, ctx, workdir, model_params, start_params)
  manager.start(state, host=None)                  # fresh: plan + select + write; resume: reuse
  manager.maybe_refresh(done_steps, state)         # online: every replay.online_every steps
  host["replay"] = manager.state_dict()            # checkpointed with the data state
  summary["selection"] = manager.summary(summary)  # tokens, TFLOPs, seconds, plan vs actual

The selection is written to <workdir>/replay_selection/ (see selection.py) by
process 0 only (every process holds the same selection in memory); on resume
that file (or, for `online`, the checkpointed buffer) is reused, so no scoring
is repeated. With `data.replay_selection` set, that selection is used as is (no
scoring) and only the mixture weights are planned. The plan depends on a
measured scoring rate (`replay.max_seconds`); process 0's measurement is
broadcast so every process plans (and scores) the same.

Every forward the scorer runs (padding, rate measurement, refreshes) counts
in `scorer.run_flops`, checkpointed with the host state; `pending(done, n)`
is the cost of the online refreshes due in the n steps after `done`, for the
stage budget's look-ahead.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable, Mapping

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cpt_jax import paths
from cpt_jax.data import selection as selection_lib
from cpt_jax.parallel import sharding as shd
from cpt_jax.replay import planner as planner_lib
from cpt_jax.replay import quota as quota_lib
from cpt_jax.replay import scoring
from cpt_jax.replay import steer as steer_lib
from cpt_jax.replay import strategies as strategies_lib


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[cpt_jax] {msg}", flush=True)


def _from_process_0(x: np.ndarray) -> np.ndarray:
  """`x` as process 0 has it, on every process (x itself with one process).

  multihost_utils.broadcast_one_to_all: every process passes its x, the others
  contribute zeros to a cross-process sum, so all get process 0's values (as
  float32 without x64); a collective, so every process must call it.
  """
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.broadcast_one_to_all(x), np.float64)


class ReplayManager:
  """Replay selection for one stage (see module docstring)."""

  def __init__(self, config, pipeline, ctx, workdir: str, model_params: Callable,
               start_params: Callable):
    """config: the run's config (replay, train, data, seed); ctx: its RunContext (model,
    mesh, shardings); model_params(params) -> model-shaped params (tau merged);
    start_params(state | None) -> the stage's starting model M (a fresh copy)."""
    c = self.config = config
    self.rcfg = c.replay
    self.pipeline = pipeline
    self.model_params, self.start_params = model_params, start_params
    self.strategy = strategies_lib.get(self.rcfg.strategy)
    self.roles = dict(zip(self.pipeline.domains, self.pipeline.roles))
    self.replay_domains = [d for d, r in self.roles.items() if r == "replay"]
    if not self.replay_domains:
      raise ValueError(f"replay.strategy={self.rcfg.strategy!r} needs replay domains: "
                       "set data.replay")
    micro = c.train.global_batch_size // c.train.grad_accum_steps
    self.scorer = scoring.Scorer(ctx.model, ctx.model_cfg, ctx.mesh, ctx.rules,
                                 self.rcfg.score_batch or micro, c.data.seq_len,
                                 pipeline.start_id)
    self.stores = {d: self.pipeline.full_training_store(d) for d in self.replay_domains}
    self.plan: dict = {}
    self.selection: strategies_lib.Selection | None = None
    self.seconds = 0.0
    self.reused = False
    # The buffer's refreshes during training: OnlineBuffer (`online`) or
    # steer.SteeredBuffer (`steered`); each has refresh, observe, cost and state_dict.
    self.refresher: OnlineBuffer | steer_lib.SteeredBuffer | None = None
    self.dir = selection_lib.selection_dir(workdir)

  # ---------------------------------------------------------------- start
  def configured_weights(self) -> dict[str, float]:
    w = self.pipeline.weights
    return {d: float(x) for d, x in zip(self.pipeline.domains, w)}

  def weights_at(self, step: int, rows: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, float]:
    """Mixture weights for the batches from `step` on: the replay share (the plan's, or
    its `replay.ramp` value at `step`) split over the replay domains by their buffer's
    row count. `rows`: {domain: row ids [n_d]}; the pipeline's current buffer when None."""
    rows = self.pipeline.replay_rows if rows is None else rows
    buffer_rows = {d: int(np.size(v)) for d, v in rows.items()}
    share = planner_lib.ramp_share(self.plan["replay_share"], self.rcfg.ramp, step,
                                   self.config.train.steps, self.rcfg.ramp_every)
    return planner_lib.replay_weights(self.plan, self.configured_weights(), self.roles,
                                      buffer_rows, share)

  def _make_plan(self, params) -> dict:
    c = self.config
    t0 = time.perf_counter()
    d0 = self.replay_domains[0]
    rate = 0.0  # a strategy that runs no forward measures no rate unless a cap needs it
    if self.strategy.runs_forwards or self.rcfg.max_seconds:
      rate = self.scorer.measure_rate(params, self.stores[d0],
                                      np.arange(min(self.scorer.batch_rows,
                                                    self.stores[d0].num_rows)))
    measure_seconds = time.perf_counter() - t0
    # A timing: processes differ. Process 0's decides, or plans (candidates,
    # refreshes) could differ and the scoring collectives hang.
    rate, measure_seconds = (float(v) for v in _from_process_0(
        np.array([rate, measure_seconds], np.float64)))
    return dict(measure_seconds=measure_seconds) | planner_lib.plan(
        rcfg=self.rcfg, steps=c.train.steps, batch=c.train.global_batch_size,
        seq_len=c.data.seq_len, weights=self.configured_weights(), roles=self.roles,
        pool_sizes={d: s.num_rows for d, s in self.stores.items()},
        f_train=self.scorer.train_flops_tok, f_fwd=self.scorer.fwd_flops_tok,
        strategy=self.strategy, lambda_kd=c.objective.lambda_kd, flops_per_second=rate,
        replay_kd=c.objective.replay_kd, grad_accum=c.train.grad_accum_steps,
        shards=shd.data_parallel_size(self.scorer.mesh))

  def _new_batches(self, n: int) -> list:
    new = [d for d, r in self.roles.items() if r == "new"]
    b = self.config.train.global_batch_size // self.config.train.grad_accum_steps
    return [self.pipeline.training_rows(new, b, self.config.seed + 7919 * (i + 1))
            for i in range(n)] if new else []

  def start(self, state, host: dict | None = None) -> None:
    """Fresh start (host None): plan, select, write, apply. Resume: reuse what was written."""
    t0 = time.perf_counter()
    resume = host is not None
    if resume:  # what earlier invocations scored and spent counts on
      self.scorer.add_counters(host)
      self.seconds = float(host.get("seconds", 0.0))
    params = self.model_params(state.params)
    self.plan = self._make_plan(params)
    _log(planner_lib.format_plan(self.plan))
    ramp = self.rcfg.ramp
    if ramp and self.plan["replay_share"] * (1 + abs(ramp)) >= 1:
      raise ValueError(f"replay.ramp={ramp}: the replay share {self.plan['replay_share']:.3g} "
                       f"would reach {self.plan['replay_share'] * (1 + abs(ramp)):.3g} of the "
                       "batch (>= 1); lower the ramp or the replay amount")
    if resume and host.get("rows") is None and paths.as_path(
        self.dir, selection_lib.SELECTION_FILE).is_file():
      host = dict(host, rows=selection_lib.read_selection(self.dir)[0])
    if resume and host.get("rows") is not None:  # reuse what the fresh start selected
      rows = {d: np.asarray(v, np.int64) for d, v in host["rows"].items()}
      self.reused = True
      self.selection = strategies_lib.Selection(rows, {d: np.full(v.size, np.nan)
                                                       for d, v in rows.items()},
                                                candidates=int(host.get("candidates", 0)))
    elif self.config.data.get("replay_selection", ""):
      rows = self.pipeline.replay_rows
      self.reused = True
      self.selection = strategies_lib.Selection(rows, {d: np.full(v.size, np.nan)
                                                       for d, v in rows.items()})
    else:
      env = strategies_lib.SelectEnv(
          stores=self.stores, seed=self.config.seed, cfg=self.rcfg, scorer=self.scorer,
          params=params, new_batches=self._new_batches,
          lookahead_lr=self.rcfg.lookahead_lr or self.config.optimizer.lr)
      k = self.plan["buffer_rows"]
      self.selection = self.strategy.select(env, k, self.plan["candidates"])
      self.seconds += time.perf_counter() - t0
      self._write()
      _log(f"replay selection [{self.strategy.name}]: {self.selection.num_rows} rows "
           f"({ {d: int(v.size) for d, v in self.selection.rows.items()} }) from "
           f"{self.selection.candidates} candidates; {self.scorer.flops / 1e12:.4g} TFLOPs, "
           f"{self.seconds:.1f}s; written to {self.dir}")
    rows = self.selection.rows
    weights = self.weights_at(int(jax.device_get(state.step)), rows)
    # On resume the pipeline's restore brings back the checkpointed weights.
    self.pipeline.set_replay_rows(rows, None if self.reused and resume else weights)
    if self.strategy.name == "online" and self.plan.get("online_refreshes"):
      self.refresher = OnlineBuffer(self, None if resume else params, host, state)
    if self.strategy.name == "steered" and self.plan.get("online_refreshes"):
      self.refresher = steer_lib.SteeredBuffer(self, host, _log)

  def _write(self) -> None:
    """Writes the selection files from process 0 (one writer, one temporary path)."""
    if jax.process_index() != 0:
      return
    s = self.selection
    selection_lib.write_selection(self.dir, s.rows, s.scores, {
        "strategy": self.strategy.name, "fraction": self.rcfg.fraction,
        "tokens": self.rcfg.tokens,
        "seq_len": self.config.data.seq_len, "unit": "packed row",
        "stores": self.pipeline.store_names(), "plan": self.plan,
        "candidates": s.candidates, "peak_held": s.peak_held, "info": _jsonable(s.info),
        "selection_tflops": self.scorer.flops / 1e12, "selection_seconds": self.seconds})

  # ---------------------------------------------------------------- online
  def _refreshes_at(self, done: int) -> bool:
    every = int(self.plan.get("online_every", self.rcfg.online_every))
    return (self.refresher is not None and every > 0 and done % every == 0
            and done < self.config.train.steps)

  def maybe_refresh(self, done: int, state) -> None:
    """After step `done`: the online / steered refresh when due, then the ramp's share."""
    if self._refreshes_at(done):
      t0 = time.perf_counter()
      self.refresher.refresh(done, state)
      self.seconds += time.perf_counter() - t0
    if (self.rcfg.ramp and done % self.rcfg.ramp_every == 0
        and done < self.config.train.steps):
      self.pipeline.set_weights(self.weights_at(done))

  def observe(self, record: dict) -> None:
    """A log window's record: the steered refresh reads the replay domains' training loss."""
    if self.refresher is not None:
      self.refresher.observe(record)

  def pending(self, done: int, n: int) -> tuple[float, float]:
    """(TFLOPs, seconds) of the online refreshes due after steps done+1..done+n."""
    k = sum(self._refreshes_at(s) for s in range(done + 1, done + n + 1))
    return self.refresher.cost(k) if k else (0.0, 0.0)

  # ---------------------------------------------------------------- state / summary
  def state_dict(self) -> dict:
    rows = self.pipeline.replay_rows
    out = {"rows": {d: [int(x) for x in v] for d, v in rows.items()},
           "seconds": self.seconds, **self.scorer.counters(),
           "candidates": self.selection.candidates if self.selection else 0}
    if self.refresher is not None:
      out[self.refresher.name] = self.refresher.state_dict()
    return out

  def summary(self, run_summary: dict) -> dict:
    """summary['selection']: selection tokens/TFLOPs/seconds and planned vs actual per component."""
    c = self.config
    L = c.data.seq_len
    roles_tok = run_summary.get("data", {}).get("tokens_per_role", {})
    f_train = self.scorer.train_flops_tok
    actual = {"selection": self.scorer.flops / 1e12,
              "new": roles_tok.get("new", 0) * f_train / 1e12,
              "replay": roles_tok.get("replay", 0) * f_train / 1e12,
              "teacher": float(run_summary.get("teacher_tflops", 0.0))}
    total_secs = float(run_summary.get("seconds", 0.0))
    train_secs = max(total_secs - self.seconds, 0.0)
    rest = actual["new"] + actual["replay"] + actual["teacher"]
    secs = {"selection": self.seconds, **{k: train_secs * actual[k] / rest if rest else 0.0
                                          for k in ("new", "replay", "teacher")}}
    total = sum(actual.values())
    return {"strategy": self.strategy.name, "tokens": self.scorer.rows_scored * L,
            "tflops": actual["selection"], "seconds": self.seconds,
            "run_tflops": self.scorer.run_flops / 1e12,  # + padding, rate measurement
            "candidates": self.selection.candidates if self.selection else 0,
            "buffer_rows": int(sum(np.size(v) for v in self.pipeline.replay_rows.values())),
            "replay_fraction": self.plan.get("replay_fraction"),
            "reused": self.reused, "peak_held": self.selection.peak_held if self.selection else 0,
            "planned": {"tflops": self.plan.get("tflops"), "seconds": self.plan.get("seconds"),
                        "total_tflops": self.plan.get("total_tflops")},
            "actual": {"tflops": actual, "seconds": secs, "total_tflops": total,
                       "selection_share": actual["selection"] / total if total else 0.0},
            "online": None, "steered": None,
            **({self.refresher.name: self.refresher.state_dict()} if self.refresher else {})}


class OnlineBuffer:
  """Sequential re-selection: every N steps swap buffer rows for more-forgotten candidates.

  Interference of a row (`replay.online_score`): 'loss', its loss under the
  current model minus its loss under M (the stage's starting params; M's losses
  of buffer rows are kept); 'kl', its mean KL(M || current) per token at
  objective.kd_temperature, what replay KD pulls back. Each refresh scores the next
  `online_pool` candidates of a rolling, seeded per-domain order (quota by
  domain size) under both, and the buffer under the current model ('kl': under
  both); per domain
  up to online_swap x (its buffer rows) of the least-interfered buffer rows are
  replaced by more-interfered candidates. Buffer sizes per domain stay fixed.
  State (buffer ids, their M losses, cursors) is host JSON in the checkpoint.
  """

  name = "online"  # its key in the checkpoint's host state and in the summary

  def __init__(self, manager: ReplayManager, start_params, host: dict | None, state=None):
    self.m = manager
    self.ref_params = None
    if start_params is not None:
      self.ref_params = jax.tree.map(jnp.copy, start_params)
    else:
      self.ref_params = manager.start_params(state)
    o = (host or {}).get("online") or {}
    self.cursor = {d: int(v) for d, v in o.get("cursor", {}).items()}
    self.ref_loss = {d: np.asarray(v, np.float64) for d, v in o.get("ref_loss", {}).items()}
    self.refreshes, self.swaps = int(o.get("refreshes", 0)), int(o.get("swaps", 0))
    self.forgetting = dict(o.get("forgetting", {}))  # per domain, at the last refresh
    self._timed = [0, 0.0]  # rows run and seconds of this invocation's refreshes
    self.kl = manager.rcfg.get("online_score", "loss") == "kl"
    self.temperature = float(manager.config.objective.kd_temperature)
    if not self.ref_loss:  # 'kl' keeps no M losses (zeros, carried along with the rows)
      rows = self.m.pipeline.replay_rows
      self.ref_loss = {d: np.zeros((np.size(rows[d]),)) if self.kl else
                       self._loss(self.ref_params, d, rows[d]) for d in rows}

  def _loss(self, params, d, rows):
    if params is None:
      return np.zeros((np.size(rows),))
    return self.m.scorer.losses(params, self.m.stores[d], np.asarray(rows, np.int64))

  def _interference(self, params, d, rows, ref_loss) -> tuple[np.ndarray, np.ndarray]:
    """(interference of `rows` under params, their M losses): 'loss' scores rows without
    known M losses (ref_loss None) under M too; 'kl' needs none (zeros)."""
    rows = np.asarray(rows, np.int64)
    if self.kl:
      return (self.m.scorer.divergences(params, self.ref_params, self.m.stores[d], rows,
                                        self.temperature), np.zeros((rows.size,)))
    if ref_loss is None:
      ref_loss = self._loss(self.ref_params, d, rows)
    return self._loss(params, d, rows) - ref_loss, ref_loss

  def _order(self, d: str) -> np.ndarray:
    n = self.m.stores[d].num_rows
    return np.random.default_rng([self.m.config.seed, zlib.crc32(d.encode()),
                                  0x6F6E6C]).permutation(n)

  def _quotas(self) -> dict[str, int]:
    pool = self.m.plan.get("online_pool", self.m.rcfg.online_pool)
    return strategies_lib.split_quota(pool, {d: s.num_rows for d, s in self.m.stores.items()})

  def _candidates(self, d: str, c0: int, quota: int) -> tuple[np.ndarray, int]:
    """The next `quota` rows of d's rolling order from cursor c0, and the next cursor."""
    order = self._order(d)
    cand = order[(c0 + np.arange(quota)) % order.size]
    return cand, (c0 + cand.size) % order.size

  def cost(self, k: int) -> tuple[float, float]:
    """(TFLOPs, seconds) of the next k refreshes: rows run (whole batches) x L x fwd FLOPs.

    Exact for the next refresh (today's buffer); later ones, whose buffer is
    not known yet, count every candidate (an upper bound). Seconds at this
    invocation's refresh pace, else at the planned forward rate.
    """
    sc, rows_run = self.m.scorer, 0
    cursor, quotas = dict(self.cursor), self._quotas()
    per_buffer = planner_lib.online_buffer_passes(self.m.rcfg)[1]
    for i in range(k):
      for d, buf in self.m.pipeline.replay_rows.items():
        cand, cursor[d] = self._candidates(d, cursor.get(d, 0), quotas.get(d, 0))
        n = int(np.sum(~np.isin(cand, buf))) if i == 0 else cand.size
        rows_run += per_buffer * sc.padded(np.size(buf)) + 2 * sc.padded(n)
    flops = rows_run * sc.seq_len * sc.fwd_flops_tok
    if self._timed[0]:
      secs = rows_run * self._timed[1] / self._timed[0]
    else:
      rate = float(self.m.plan.get("flops_per_second") or 0.0)
      secs = flops / rate if rate > 0 else 0.0
    return flops / 1e12, secs

  def observe(self, record: Mapping) -> None:
    """Log records carry nothing this refresh uses (it scores rows itself)."""

  def refresh(self, step: int, state) -> None:
    """Re-scores the buffer and fresh candidates under the current model; swaps rows."""
    params = self.m.model_params(state.params)
    t0, r0 = time.perf_counter(), self.m.scorer.rows_run
    rows = self.m.pipeline.replay_rows
    quotas = self._quotas()
    scored = {}
    for d, buf in rows.items():
      cand, self.cursor[d] = self._candidates(d, self.cursor.get(d, 0), quotas.get(d, 0))
      cand = cand[~np.isin(cand, buf)]
      buf_int, _ = self._interference(params, d, buf, self.ref_loss[d])
      cand_int, cand_ref = self._interference(params, d, cand, None)
      scored[d] = (buf_int, cand, cand_ref, cand_int)
    sizes = {d: int(np.size(b)) for d, b in rows.items()}
    if self.m.rcfg.online_quota > 0:  # buffer rows move to the domains that forget most
      # Each domain's mean buffer-row interference, averaged with the last refresh's
      # estimate (an exponential average: a few buffer rows are a noisy measure).
      now = {d: float(np.mean(v[0])) if v[0].size else 0.0 for d, v in scored.items()}
      self.forgetting = {d: (now[d] + self.forgetting[d]) / 2 if d in self.forgetting
                         else now[d] for d in now}
      sizes = quota_lib.allocate(sum(sizes.values()),
                                 {d: s.num_rows for d, s in self.m.stores.items()},
                                 self.forgetting, self.m.rcfg.online_quota,
                                 cap={d: sizes[d] + v[1].size for d, v in scored.items()})
    new_rows = {}
    for d, (buf_int, cand, cand_ref, cand_int) in scored.items():
      buf, ref = rows[d].copy(), self.ref_loss[d].copy()
      if sizes[d] < buf.size:  # keep the most interfered rows
        keep = np.sort(np.argsort(-buf_int, kind="stable")[:sizes[d]])
        buf, ref, buf_int = buf[keep], ref[keep], buf_int[keep]
      elif sizes[d] > buf.size:  # add the most interfered candidates
        add = np.argsort(-cand_int, kind="stable")[:sizes[d] - buf.size]
        buf, ref = np.concatenate([buf, cand[add]]), np.concatenate([ref, cand_ref[add]])
        buf_int = np.concatenate([buf_int, cand_int[add]])
        rest = np.setdiff1d(np.arange(cand.size), add)
        cand, cand_ref, cand_int = cand[rest], cand_ref[rest], cand_int[rest]
      s = min(int(self.m.rcfg.online_swap * buf.size), cand.size)
      out_pos = np.argsort(buf_int, kind="stable")[:s]
      in_pos = np.argsort(-cand_int, kind="stable")[:s]
      better = cand_int[in_pos] > buf_int[out_pos]
      out_pos, in_pos = out_pos[better], in_pos[better]
      buf[out_pos], ref[out_pos] = cand[in_pos], cand_ref[in_pos]
      order_N = np.argsort(buf, kind="stable")
      new_rows[d], self.ref_loss[d] = buf[order_N], ref[order_N]
      self.swaps += int(out_pos.size)
    self.refreshes += 1
    weights = None
    if self.m.rcfg.online_quota > 0:  # each buffer row still replayed equally often
      weights = self.m.weights_at(step, new_rows)
    self.m.pipeline.set_replay_rows(new_rows, weights)
    self._timed[0] += self.m.scorer.rows_run - r0
    self._timed[1] += time.perf_counter() - t0
    _log(f"replay online refresh at step {step}: {self.swaps} swaps so far"
         + (f"; buffer rows per domain {sizes}" if self.m.rcfg.online_quota > 0 else ""))

  def state_dict(self) -> dict:
    return {"cursor": dict(self.cursor), "refreshes": self.refreshes, "swaps": self.swaps,
            "forgetting": dict(self.forgetting),
            "ref_loss": {d: [float(x) for x in v] for d, v in self.ref_loss.items()}}


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x
