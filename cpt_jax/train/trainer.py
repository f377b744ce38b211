"""The training loop: one run (one stage) from a config to a checkpointed model.

Init order: (1) resume from the newest checkpoint in `<workdir>/checkpoints`
that restores (a damaged newer one is named and moved to `checkpoints/damaged/`,
checkpoint.py); else (2) warm-start params from `train.init_checkpoint` or
`train.init_from_hf` (continued pre-training; the optimizer starts fresh;
context.py `starting_params`); else (3) random init.

Side effects (I/O, logging, checkpoints) live here; everything inside
`jit` is pure (see step.py / objective.py). `Trainer.run` is the loop: step,
hooks (train/hooks.py; the features' list, in order, is `cpt_jax/features.py`
`make_hooks`, passed as `hooks_fn`; without it only the budget stop, metric
writer and callback run), checkpoint, then evaluation (a failing evaluation never
costs the checkpoint). Metrics are fetched one step late so dispatch stays
asynchronous; a NaN/Inf loss, non-finite parameters (checked at every log and
checkpoint boundary, before the save) or a loss spike is a divergence
(divergence.py): the run stops naming the newest good checkpoint
(`DivergenceError`) or rolls back to it (`train.on_divergence`). With
`replay.max_tflops` / `replay.max_seconds` set, the stage ends early at the log
boundary before a cap would be passed (budget.py). A hook that reports `preempted`
after a step (train/preemption.py: SIGTERM, agreed across processes) makes the loop
save that step and raise `preemption.Preempted`.

The workdir (workdir.py): process 0 holds its lock (`run.lock`) from `__init__`
to `close`; `prepare` compares the settings with the recorded ones (config.json +
config_history.jsonl) before anything is restored, and drops the metric records
past the start step; `_prepare_run` records the invocation.

About 500 lines, over the project's 400: the loop (`run`, one page) and the
named steps it calls (prepare, fetch, record, stop, divergence, save, summary,
the stage's FLOP accounting) share the run's state; the run context, the
starting params, the metric window, the hooks, the divergence checks and the
workdir's lock and identity already live in context.py, metrics.py, hooks.py,
divergence.py and workdir.py.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cpt_jax import batch as batch_lib
from cpt_jax import data as data_lib
from cpt_jax import paths
from cpt_jax.eval import evaluate as eval_lib
from cpt_jax.model import hf
from cpt_jax.model.transformer import flops_per_token
from cpt_jax.parallel import distributed
from cpt_jax.parallel import sharding as shd
from cpt_jax.schema import mixing as mixing_schema
from cpt_jax.schema import train as train_schema
from cpt_jax.train import budget as budget_lib
from cpt_jax.train import checkpoint as ckpt_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import divergence as divergence_lib
from cpt_jax.train import hooks as hooks_lib
from cpt_jax.train import layout as layout_lib
from cpt_jax.train import metrics as metrics_lib
from cpt_jax.train import objective as objective_lib
from cpt_jax.train import preemption
from cpt_jax.train import regularizers
from cpt_jax.train import state as state_lib
from cpt_jax.train import step as step_lib
from cpt_jax.train import workdir as workdir_lib


def log(msg: str) -> None:
  """Prints a status line from the lead process."""
  if jax.process_index() == 0:
    print(f"[cpt_jax] {msg}", flush=True)


DivergenceError = divergence_lib.DivergenceError  # a NaN / Inf or a spike stopped the run


class Trainer:
  """Runs `config.train.steps` steps of one stage in `workdir`.

  hooks_fn(env: hooks.Env) -> [Hook]: the run's hooks in order (`features.make_hooks`;
  default `hooks.loop_hooks`; a config that sets a feature no hook runs is refused);
  `frozen_fn(ctx, params, pipeline) -> dict` builds the frozen trees (teacher,
  Fisher) at a fresh start; `on_metrics(step, metrics, pipeline)` sees every
  logged record.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               pipeline=None, frozen_fn: Callable | None = None,
               on_metrics: Callable | None = None, devices=None,
               hooks_fn: Callable[[hooks_lib.Env], list] | None = None):
    distributed.maybe_initialize(config.distributed)
    config = hf.apply_hf_config(config)
    self.config = config
    self.workdir = paths.absolute(workdir)  # a gs:// workdir stays a URI
    self.ctx = context_lib.build_context(config, devices)
    self.is_lead = jax.process_index() == 0
    paths.as_path(self.workdir).mkdir(parents=True, exist_ok=True)
    # One writer per workdir (workdir.py): process 0 holds the lock from here to `close`.
    self.lock = workdir_lib.WorkdirLock(
        self.workdir, config.train.lock_stale_minutes).acquire() if self.is_lead else None
    try:
      self._build(config, pipeline, frozen_fn, on_metrics, hooks_fn)
    except BaseException:
      self._release_lock()
      raise

  def _build(self, config, pipeline, frozen_fn, on_metrics, hooks_fn) -> None:
    """The run's pipeline, checkpointer, loss and step (`__init__`, under the lock)."""
    if pipeline is None:
      pipeline = data_lib.make_pipeline(
          config.data, global_batch_size=config.train.global_batch_size,
          process_index=jax.process_index(), process_count=jax.process_count(),
          workdir=self.workdir)
    self.pipeline = pipeline
    self.frozen_fn = frozen_fn
    self.on_metrics = on_metrics
    self.hooks_fn = hooks_fn or hooks_lib.loop_hooks
    mixing_schema.validate_mixing_config(config.mixing, pipeline.domains, pipeline.roles,
                                         config.train.log_every)
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoints)
    obj = config.objective
    self.loss_fn = objective_lib.make_loss_fn(
        self.ctx.apply_fn, obj, pipeline.num_domains, config.train.z_loss, layout=self.ctx.layout,
        total_steps=config.train.steps, features_fn=self.ctx.features_fn)
    self._step_fn = step_lib.make_train_step(self.loss_fn, self.ctx.layout,
                                             config.train.grad_accum_steps)
    self._jitted: dict[bool, Callable] = {}
    self._eval_step = None
    # Steps whose batch had no row for the teacher, in runs whose teacher runs on rows.
    self.has_teacher_rows = obj.lambda_kd > 0 or obj.replay_kd > 0
    self.teacher_skipped_steps = 0
    self.teacher_rows = 0
    self.pullback_rows = 0  # rows through a layout's second pull-back (projection, subtree)
    self.state: state_lib.TrainState | None = None
    self.budget = budget_lib.StageBudget(max_tflops=float(config.replay.max_tflops),
                                         max_seconds=float(config.replay.max_seconds))
    self._t_start = time.perf_counter()
    self.hooks: list[hooks_lib.Hook] = []  # built by `hooks_fn` once the state exists
    self.guard = divergence_lib.Guard(config.train)
    self._all_finite = jax.jit(divergence_lib.all_finite,
                               out_shardings=shd.replicated(self.ctx.mesh))
    self.identity: workdir_lib.RunIdentity | None = None  # checked by `prepare`

  # ------------------------------------------------------------------ init
  def _jit_for(self, with_distill: bool) -> Callable:
    if with_distill not in self._jitted:
      keys = batch_lib.FIELDS + (("distill_index",) if with_distill else ())
      self._jitted[with_distill] = step_lib.jit_train_step(
          self._step_fn, self.ctx.state_sh, self.ctx.mesh, self.ctx.rules, keys)
    return self._jitted[with_distill]

  def initial_state(self) -> tuple[state_lib.TrainState, str, dict | None]:
    """Resume > warm start > scratch; returns (state, how, the checkpoint's host state
    or None on a fresh start)."""
    c, ctx = self.config, self.ctx
    if self.checkpointer.latest_step() is not None:
      state, host, notes = self.checkpointer.restore_newest_intact(self._abstract_state())
      for note in notes:
        log(note)
      return state, f"resumed from step {int(state.step)}", host
    params, how = context_lib.starting_params(self.ctx)
    if params is not None:
      state = state_lib.with_params(params, ctx.layout, ctx.state_sh, c.seed)
    else:
      state = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, c.seed, c.data.seq_len)
    if ctx.frozen_keys:
      frozen = (self.frozen_fn or context_lib.default_frozen)(ctx, state.params, self.pipeline)
      frozen = jax.tree.map(lambda x, s: jax.device_put(x, s), frozen,
                            {k: ctx.state_sh.frozen[k] for k in frozen})
      state = state.replace(frozen=frozen)
    return state, how, None

  def _abstract_state(self) -> state_lib.TrainState:
    ctx = self.ctx
    return state_lib.abstract_state(ctx.model, ctx.layout, ctx.state_sh,
                                    self.config.data.seq_len, ctx.frozen_keys)

  def prepare(self, writer=None) -> str:
    """The run's identity checked against the workdir's (`check_identity`), the state
    (`initial_state`), then the hooks (`hooks_fn`) built and started in list order, then on
    resume the loop's own host state (data position, teacher counters); the metric files
    lose their records past the start step; returns how the state was made."""
    configured_weights = self.check_identity()
    self.state, how, host = self.initial_state()
    env = hooks_lib.Env(
        config=self.config, pipeline=self.pipeline, ctx=self.ctx, workdir=self.workdir,
        writer=writer, budget=self.budget, usage=self._usage, model_params=self.model_params,
        start_params=self.reference_params, reference_losses=self.reference_losses,
        evaluate=self.evaluate, on_metrics=self.on_metrics)
    self.hooks = self.hooks_fn(env)
    names = {h.name for h in self.hooks} | {type(h).__name__ for h in self.hooks}
    c = self.config
    wanted = {  # config key: (whether it is on, the hook that runs it)
        "replay.strategy": (bool(c.replay.strategy), "replay"),
        "mixing.controller": (c.mixing.controller != "static", "mixing"),
        "train.profile_steps": (train_schema.parse_profile_steps(c.train.profile_steps)
                                is not None, "Profile"),
        "decomposition.eval_without_tau": (self.ctx.layout.has_delta
                                           and bool(c.decomposition.eval_without_tau),
                                           "EvalWithoutTau")}
    missing = [k for k, (on, hook) in wanted.items() if on and hook not in names]
    if missing:
      raise ValueError(f"the config sets {missing} but the run has no hook for it; run it "
                       "with cpt_jax.run.train (hooks_fn=features.make_hooks)")
    for h in self.hooks:
      h.start(self.state, None if host is None else host.get(h.name))
    if host is not None:
      self.pipeline.restore(host["data"])
      self._apply_changed_weights(configured_weights)
      self.teacher_skipped_steps = int(host.get("teacher_skipped_steps", 0))
      self.teacher_rows = int(host.get("teacher_rows", 0))
      self.pullback_rows = int(host.get("pullback_rows", 0))
      self.guard.load_state_dict(host.get("divergence"))
    dropped = writer.start(int(jax.device_get(self.state.step))) if writer is not None else {}
    if dropped:
      log(f"{os.path.basename(self.workdir)}: {how}; dropped the records past it: {dropped}")
    return how

  def check_identity(self):
    """Compares the run's settings with the workdir's recorded ones before anything is
    restored or written (workdir.py: a change outside the allow-list raises
    ConfigChangedError unless train.on_config_change='continue'); returns the mixture
    weights data.weights configures (the pipeline's before a restore)."""
    self.identity = workdir_lib.RunIdentity(self.workdir, self.config).check(
        self.checkpointer.latest_step())
    return self.pipeline.weights

  def _apply_changed_weights(self, configured) -> None:
    """A resume keeps the checkpoint's mixture weights; changed data.weights (accepted by
    on_config_change='continue') replace them from here, when no controller or replay
    selection owns the weights."""
    if "data.weights" not in self.identity.changes:
      return
    c = self.config
    if c.mixing.controller == "static" and not c.replay.strategy:
      self.pipeline.set_weights(configured)
    else:
      log(f"data.weights changed, but {c.mixing.controller!r} / replay.strategy="
          f"{c.replay.strategy!r} set the weights of a resumed run: the change has no effect")

  def hook(self, name: str) -> hooks_lib.Hook | None:
    """The run's hook called `name` (e.g. 'replay', 'mixing'), or None."""
    return next((h for h in self.hooks if h.name == name), None)

  def reference_params(self, state=None):
    """The stage's starting model M, model-shaped (`context.reference_params`)."""
    return context_lib.reference_params(self.ctx, state)

  def reference_losses(self, params, rows_per_domain: int | None = None) -> dict[str, float]:
    """Per-domain CE of model-shaped `params` (the stage's starting model) on training rows.

    The reference the rate controllers compare the running loss against. Its
    forwards count in the stage's budget (`budget.counted['reference']`).
    """
    rows = rows_per_domain or self.config.train.global_batch_size
    seq_len = self.config.data.seq_len
    out = {}
    self._ensure_eval_step()
    for d, r in zip(self.pipeline.domains, self.pipeline.roles):
      if r not in ("new", "replay", "distill"):
        continue
      batch = self.pipeline.training_rows([d], rows, self.config.seed)
      m = jax.device_get(self._eval_step(params, {
          k: jax.device_put(v, shd.replicated(self.ctx.mesh)) for k, v in batch.items()}))
      out[d] = float(m["ce_sum"]) / max(float(m["tokens"]), 1.0)
      self.budget.count("reference", batch["inputs"].shape[0] * seq_len * flops_per_token(
          self.ctx.model_cfg, seq_len, training=False) / 1e12)
    return out

  # ------------------------------------------------------------------ eval
  def model_params(self, params):
    """The model's params (sigma + tau merged when decomposed), for forward-only uses."""
    return self.ctx.model_params(params)

  def _ensure_eval_step(self) -> None:
    if self._eval_step is None:
      table = eval_lib.token_byte_lengths(self.pipeline.vocab, self.ctx.model_cfg.vocab_size)
      self._eval_step = eval_lib.make_eval_step(self.ctx.apply_fn, table, self.ctx.mesh,
                                                self.ctx.rules)

  def evaluate(self, params=None, domains=None) -> dict[str, dict[str, float]]:
    """Per-domain validation loss and bits/byte of model-shaped `params` (default: the
    state's model) on `domains` (default: every domain of the run)."""
    self._ensure_eval_step()
    params = self.model_params(self.state.params) if params is None else params
    return eval_lib.evaluate_domains(
        self._eval_step, params, self.pipeline, self.pipeline.domains if domains is None
        else domains, self.config.train.global_batch_size // self.config.train.grad_accum_steps,
        self.config.train.eval_batches, self.ctx.mesh)

  # ------------------------------------------------------------------ batches
  def _device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    batch = shd.global_batch({k: local[k] for k in batch_lib.FIELDS}, self.ctx.mesh)
    o = self.config.objective
    if o.lambda_kd > 0 or o.replay_kd > 0:
      roles = local["roles"]
      if jax.process_count() > 1:
        roles = np.asarray(multihost_utils.process_allgather(roles, tiled=True))
      idx = step_lib.distill_index(roles, self.config.train.grad_accum_steps,
                                   with_replay=o.replay_kd > 0, with_distill=o.lambda_kd > 0,
                                   shards=shd.data_parallel_size(self.ctx.mesh))
      if idx is not None:
        batch["distill_index"] = step_lib.device_distill_index(idx, self.ctx.mesh)
    return batch

  # ------------------------------------------------------------------ loop
  def run(self) -> dict[str, Any]:
    """Trains to `train.steps` (or a budget stop); returns the run summary."""
    t = self.config.train
    self._t_start = time.perf_counter()
    writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_lead)
    how = self.prepare(writer)
    start = int(jax.device_get(self.state.step))
    if start == 0:  # a cap below the first log window: an error now, not a stop after it
      self.budget.check_first_window(self._usage(0), min(t.log_every, t.steps),
                                     self._train_tflops(1))
    end = self._prepare_run(start, how)
    self._window, self._pending, self._t_window = metrics_lib.Window(self.pipeline.num_domains), None, \
        time.perf_counter()
    self.budget.start_window(self._usage(start))
    bar = tqdm(total=t.steps, initial=start, desc=os.path.basename(self.workdir) or "train",
               unit="step", dynamic_ncols=True) if t.progress_bar and self.is_lead else None
    last, last_eval, step = {}, {}, start
    try:
      while step < end:
        self.state, metrics = self._train_step(self.pipeline.next_batch())
        done, is_last = step + 1, step + 1 == t.steps
        for h in self.hooks:
          h.after_step(done, self.state)
        preempted = any([h.preempted(done) for h in self.hooks])  # SIGTERM: save, stop
        logs, saves = done % t.log_every == 0, done % t.checkpoint_every == 0
        try:  # NaN / Inf loss or params, or a loss spike: stop, or roll back and go on
          self._fetch(done, metrics, now=logs or saves or is_last or preempted)  # else late
          if logs:
            self.guard.check_window(done, self._window.mean("loss"), self._window.steps)
        except divergence_lib.Diverged as d:
          step = self._on_divergence(d, done)
          if bar is not None:
            bar.n = step
          continue
        if logs and not is_last:  # e.g. the hard budget: stop before a cap would be passed
          is_last = self._should_stop(done, min(t.log_every, t.steps - done))
        if logs or is_last:
          last = self._record(done)
          for h in self.hooks:
            h.on_log(done, last)
          if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
        if saves or is_last or preempted:  # before the evaluation: a failing one never costs
          self.save(done)  # the checkpoint
        if preempted and not is_last:
          log(f"{os.path.basename(self.workdir)}: preempted at step {done}: saved")
          raise preemption.Preempted(done, self.workdir)
        if (t.eval_every and done % t.eval_every == 0) or is_last:
          last_eval = self.evaluate()
          writer.write(done, last_eval, kind="eval")
        if bar is not None:
          bar.update(1)
        if is_last:
          break
        step = done
      self._fetch(None, None, now=True)
    finally:
      if bar is not None:
        bar.close()
      writer.close()
      self.checkpointer.wait()
    return self._summary(how, start, last, last_eval or self.evaluate())

  def _prepare_run(self, start: int, how: str) -> int:
    """Logs where the run starts, records it in the workdir (config.json on a fresh start,
    a config_history.jsonl line), takes the state's bytes per group and the peak FLOP/s
    for MFU; returns the step to train to."""
    c, t = self.config, self.config.train
    end = t.steps if self.budget.stopped_at is None else start  # a cap ended it earlier
    name = os.path.basename(self.workdir)
    if end == start < t.steps:
      log(f"{name}: stopped at step {start} by its budget earlier ({self.budget.reason}); "
          "not training further")
    log(f"{name}: {how}; steps {start}..{t.steps}; "
        f"{layout_lib.tree_size(self.state.params):,} params on mesh {dict(self.ctx.mesh.shape)}")
    if self.is_lead:
      self.identity.record(start, how)
    # Parameter / optimizer-state bytes per group (sigma / tau, or 'model').
    self._state_bytes = self.ctx.layout.state_bytes(self.state.params, self.state.opt_state)
    # MFU = model FLOP/s over the whole mesh's peak: one device's peak x devices.
    self._peak = float(t.peak_flops) or metrics_lib.measure_matmul_peak(
        dtype=jnp.dtype(c.model.dtype))
    return end

  def _train_step(self, local: dict[str, np.ndarray]) -> tuple[Any, dict]:
    batch = self._device_batch(local)
    return self._jit_for("distill_index" in batch)(self.state, batch)

  def _fetch(self, done: int | None, metrics, now: bool) -> None:
    """Fetches the previous step's metrics (and this one's if `now`) into the window.

    Metrics are fetched one step late so dispatch stays asynchronous; with `now` (log
    and checkpoint boundaries) whether the state's params are all finite is fetched
    with them. A NaN / Inf loss or params raise `Diverged` before a checkpoint of that
    state is written.
    """
    todo = [self._pending] if self._pending is not None else []
    self._pending = None if done is None else (done, metrics)
    if now and self._pending is not None:
      todo.append((done, {**metrics, "params_finite": self._all_finite(self.state.params)}))
      self._pending = None
    for s, m in todo:
      m = jax.device_get(m)
      self.guard.check_step(s, float(m["loss"]), bool(m.pop("params_finite", True)))
      if int(m["teacher_rows"]) == 0 and self.has_teacher_rows:
        self.teacher_skipped_steps += 1
      self.teacher_rows += int(m["teacher_rows"])
      self.pullback_rows += int(m.get("pullback_rows", 0))
      self._window.add(m)

  def _on_divergence(self, d: divergence_lib.Diverged, done: int) -> int:
    """Stops naming the newest good checkpoint (DivergenceError), or rolls back to it.

    Kept steps after the good one are moved to `checkpoints/damaged/` either way (a rerun
    resumes from the good one). A rollback reloads the model and optimizer of the good
    step; the data, the hooks and the counters go on from `done`, so the batches since
    that step are skipped, and the steps thrown away count in the budget ('diverged').
    Returns the step the loop goes on from.
    """
    self._pending, self._window = None, metrics_lib.Window(self.pipeline.num_domains)
    self.checkpointer.wait()
    kept = self.checkpointer.all_steps()
    good = divergence_lib.good_step(kept, d.first_bad)
    moved = [self.checkpointer.set_aside(s, "diverged", d.reason) for s in kept
             if good is not None and s > good]
    why = self.guard.why_stop(good)
    if why:
      raise DivergenceError(
          self.guard.stop_message(d, good, kept, moved, why, self.workdir)) from None
    self.state, host, notes = self.checkpointer.restore_newest_intact(self._abstract_state())
    back = int(jax.device_get(self.state.step))
    skipped = (int(host["data"]["step"]), self.pipeline.step)  # data steps [from, to)
    self.budget.count("diverged", self._train_tflops(done) - self._train_tflops(back))
    self.guard.rollbacks.append({"found_at": done, "to": back, "reason": d.reason,
                                 "skipped_batches": list(skipped)})
    for note in notes:
      log(note)
    log(f"{os.path.basename(self.workdir)}: {d.reason}; rolled back to step {back} "
        f"({len(self.guard.rollbacks)} of train.max_rollbacks={self.guard.max_rollbacks}); "
        f"the model leaves out the batches of data steps {skipped[0]}..{skipped[1] - 1}")
    self._t_window = time.perf_counter()
    self.budget.start_window(self._usage(back))
    return back

  def _record(self, done: int) -> dict[str, Any]:
    """The log record of the window ending at `done` (then a new window starts)."""
    c, domains = self.config, list(self.pipeline.domains)
    dt = time.perf_counter() - self._t_window
    record = self._window.summary(domains)
    tps = self._window.steps * c.train.global_batch_size * c.data.seq_len / max(dt, 1e-9)
    record.update(
        learning_rate=float(self.ctx.schedule(done - 1)), tokens_per_sec=tps,
        mfu=tps * flops_per_token(self.ctx.model_cfg, c.data.seq_len)
        / (self._peak * self.ctx.mesh.devices.size),
        teacher_skipped_steps=self.teacher_skipped_steps, teacher_rows=self.teacher_rows,
        weights=metrics_lib.named_weights(domains, self.pipeline.weights), data=self.pipeline.stats(),
        state_bytes=self._state_bytes)
    self._window, self._t_window = metrics_lib.Window(len(domains)), time.perf_counter()
    return record

  def _should_stop(self, done: int, next_steps: int) -> bool:
    """Whether a hook ends the stage at `done` (the same answer on every process)."""
    for h in self.hooks:
      reason = h.should_stop(done, next_steps)
      if reason:
        log(f"{os.path.basename(self.workdir)}: stopping at step {done} of "
            f"{self.config.train.steps}: {reason}")
        return True
    return False

  def _summary(self, how: str, start: int, last: dict, last_eval: dict) -> dict[str, Any]:
    """The run summary: tokens and FLOPs count the whole stage (to its final step),
    also after a resume; `seconds` and `steps_run` are this invocation's."""
    c, ctx = self.config, self.ctx
    final = int(jax.device_get(self.state.step))
    summary = {
        "step": final, "init": how, "last": last,
        "eval": last_eval, "domains": list(self.pipeline.domains),
        "roles": list(self.pipeline.roles), "seconds": time.perf_counter() - self._t_start,
        "steps_run": final - start,
        "train_tokens": final * c.train.global_batch_size * c.data.seq_len,
        "train_tflops": self._train_tflops(final),
        "teacher_rows": self.teacher_rows,
        "teacher_tflops": self._teacher_tflops(),
        "teacher_skipped_steps": self.teacher_skipped_steps, "peak_flops": self._peak,
        "pullback_rows": self.pullback_rows, "pullback_tflops": self._pullback_tflops(),
        "fisher_tflops": self._fisher_tflops(),
        "num_devices": int(ctx.mesh.devices.size),
        "data": self.pipeline.stats(), "config_changes": self.identity.changes_made()}
    summary["state_bytes"] = self._state_bytes  # parameter / optimizer bytes per group
    summary["rollbacks"] = list(self.guard.rollbacks)  # train.on_divergence='rollback'
    for h in self.hooks:  # replay selection cost, the budget's use, eval without tau
      entry = h.summary(summary, self.state) if h.summary_key else None
      if entry is not None:
        summary[h.summary_key] = entry
    return summary

  def save(self, step: int) -> None:
    host = {"data": self.pipeline.state(), "teacher_skipped_steps": self.teacher_skipped_steps,
            "teacher_rows": self.teacher_rows, "pullback_rows": self.pullback_rows,
            "divergence": self.guard.state_dict(),
            **hooks_lib.host_state(self.hooks)}
    self.checkpointer.save(step, self.state, host)

  def _train_tflops(self, step: int) -> float:
    """Model FLOPs of the train steps up to `step` (whole stage)."""
    c = self.config
    return (step * c.train.global_batch_size * c.data.seq_len
            * flops_per_token(self.ctx.model_cfg, c.data.seq_len) / 1e12)

  def _teacher_tflops(self) -> float:
    """Teacher forwards so far (rows as run, bucket padding included)."""
    seq_len = self.config.data.seq_len
    return self.teacher_rows * seq_len * flops_per_token(
        self.ctx.model_cfg, seq_len, training=False) / 1e12

  def _pullback_tflops(self) -> float:
    """Second pull-backs so far (objective.projection, sigma / tau subtree): a backward
    pass per row."""
    seq_len, cfg = self.config.data.seq_len, self.ctx.model_cfg
    return self.pullback_rows * seq_len * (flops_per_token(cfg, seq_len) - flops_per_token(
        cfg, seq_len, training=False)) / 1e12

  def _fisher_tflops(self) -> float:
    """The stage's EWC Fisher pass (run once, at its fresh start); 0 without EWC."""
    if "fisher" not in self.ctx.frozen_keys:
      return 0.0
    return regularizers.fisher_tflops(self.config, self.ctx.model_cfg)

  def _usage(self, step: int) -> budget_lib.Usage:
    """Seconds (all invocations) and TFLOPs by `step`: train steps, teacher forwards, every
    replay scoring forward run (padding, rate measurement, refreshes), the EWC Fisher pass
    (default frozen trees) and the controllers' reference forwards; the one-off parts are
    `fixed_*`, the online refreshes due next the `lookahead`."""
    parts = {"train": self._train_tflops(step), "teacher": self._teacher_tflops(),
             **self.budget.counted}
    if self.pullback_rows:
      parts["second_pullback"] = self._pullback_tflops()
    if self.frozen_fn is None and (fisher := self._fisher_tflops()):  # at the fresh start
      parts["fisher"] = fisher
    fixed_s, ahead = 0.0, []
    for cost in filter(None, (h.cost(step) for h in self.hooks)):  # replay selection
      parts.update(cost.tflops)
      fixed_s += cost.seconds
      if cost.lookahead is not None:
        ahead.append(cost.lookahead)
    lookahead = (lambda n: tuple(map(sum, zip(*(f(n) for f in ahead))))) if ahead else None
    return budget_lib.Usage(step=step, tflops=sum(parts.values()),
                            seconds=self.budget.seconds_before + time.perf_counter()
                            - self._t_start,
                            fixed_tflops=sum(v for k, v in parts.items()
                                             if k not in ("train", "teacher")),
                            fixed_seconds=fixed_s, lookahead=lookahead, parts=parts)

  def close(self) -> None:
    try:
      self.checkpointer.close()
      self.pipeline.close()
    finally:
      self._release_lock()

  def _release_lock(self) -> None:
    if self.lock is not None:
      self.lock.release()


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict[str, Any]:
  """Builds a Trainer, runs it and closes it; returns the run summary."""
  trainer = Trainer(config, workdir, **kwargs)
  try:
    return trainer.run()
  finally:
    trainer.close()
