"""Replay selection strategies behind one interface.

A strategy picks k packed rows from the replay domains' training stores:

  random        uniform over all rows of all replay domains (no scoring)
  proportional  stratified: each domain gets k * (its rows / all rows), uniform inside
  teacher_loss  M's per-row loss (one forward); keep a quantile band [band_low, band_high]
  forgetting    MIR-style interference, made cheap: loss under M' minus loss under M,
                where M' is M after `lookahead_steps` virtual sign-SGD steps on T batches,
                computed once (not per example); top-k
  diversity     greedy k-center on pooled final hidden states of M, per domain
  gradient      first-order interference from the unembedding's per-row gradient against
                T's mean gradient (cpt_jax/replay/gradient.py); top-k
  dro           k rows drawn with probability ~ exp(M's loss / dro_temperature): the
                closed-form IR-DRO instance weights (Chen et al., 2024; replay/dro.py)
  online        starts from random/proportional; re-selection happens during training
                (cpt_jax/replay/manager.py: OnlineBuffer)
  steered       starts like online; refreshes re-split and rotate the buffer from the
                replay rows' training loss, no forward (cpt_jax/replay/steer.py)

Score-based strategies draw `candidates` rows (stratified by domain size,
uniform inside a domain), stream them through the Scorer batch by batch and
keep only bounded selectors (cpt_jax/replay/streaming.py). Each strategy
declares its cost for the planner: forward row-passes per candidate and fixed
FLOPs (the look-ahead steps); what it really spent is read off the Scorer.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Mapping

import numpy as np

from cpt_jax.replay import dro as dro_lib
from cpt_jax.replay import gradient as gradient_lib
from cpt_jax.replay import streaming


@dataclasses.dataclass
class SelectEnv:
  """What a strategy may use."""
  stores: Mapping[str, Any]  # replay domain -> its full training PackedStore
  seed: int
  cfg: Any  # config.replay
  scorer: Any = None  # scoring.Scorer (score-based strategies)
  params: Any = None  # M's params
  new_batches: Callable[[int], list] | None = None  # n -> n global-size T batches
  lookahead_lr: float = 0.0


@dataclasses.dataclass
class Selection:
  rows: dict[str, np.ndarray]
  scores: dict[str, np.ndarray]
  candidates: int = 0
  peak_held: int = 0
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_rows(self) -> int:
    return int(sum(np.size(v) for v in self.rows.values()))


def split_quota(k: int, sizes: Mapping[str, int]) -> dict[str, int]:
  """k split in proportion to sizes (largest remainder), never above a domain's size."""
  names = sorted(sizes)
  n = np.array([max(int(sizes[d]), 0) for d in names], np.float64)
  k = int(min(k, n.sum()))
  if k <= 0 or n.sum() == 0:
    return {d: 0 for d in names}
  exact = k * n / n.sum()
  q = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - q), kind="stable")[:k - q.sum()]:
    q[i] += 1
  return {d: int(min(qi, ni)) for d, qi, ni in zip(names, q, n)}


def _rng(seed: int, *tags) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(t) & 0xFFFFFFFF for t in tags]])


def _tag(name: str) -> int:
  return zlib.crc32(name.encode("utf-8"))


def draw_candidates(sizes: Mapping[str, int], n: int, seed: int) -> dict[str, np.ndarray]:
  """n candidate rows, stratified by domain size, uniform (without replacement) inside."""
  out = {}
  for d, q in split_quota(n, sizes).items():
    out[d] = np.sort(_rng(seed, _tag(d), 0x63616E).choice(int(sizes[d]), q, replace=False)) \
        if q else np.zeros((0,), np.int64)
  return out


class Strategy:
  """Base: name, planner cost model and `select`."""
  name = ""
  forwards_per_candidate = 0.0  # forward row-passes per candidate scored
  runs_forwards = True  # False: neither selection nor refreshes run a forward

  def fixed_flops(self, cfg, batch_rows: int, seq_len: int, train_flops_tok: float) -> float:
    return 0.0

  def min_candidates(self, k: int, cfg) -> int:
    """Fewest candidates that can yield k rows."""
    return k

  def select(self, env: SelectEnv, k: int, num_candidates: int) -> Selection:
    raise NotImplementedError


class Random(Strategy):
  name = "random"

  def select(self, env, k, num_candidates):
    names = sorted(env.stores)
    sizes = np.array([env.stores[d].num_rows for d in names], np.int64)
    k = int(min(k, sizes.sum()))
    flat = np.sort(_rng(env.seed, 0x72616E).choice(int(sizes.sum()), k, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    rows = {d: flat[(flat >= bounds[i]) & (flat < bounds[i + 1])] - bounds[i]
            for i, d in enumerate(names)}
    return Selection(rows, {d: np.full(r.size, np.nan) for d, r in rows.items()},
                     peak_held=k)


class Proportional(Strategy):
  name = "proportional"

  def select(self, env, k, num_candidates):
    rows = draw_candidates({d: s.num_rows for d, s in env.stores.items()}, k, env.seed + 1)
    return Selection(rows, {d: np.full(r.size, np.nan) for d, r in rows.items()},
                     peak_held=int(sum(r.size for r in rows.values())))


class _Scored(Strategy):
  """Streams candidates through per-domain (stratify) or global bounded selectors."""
  forwards_per_candidate = 1.0
  per_domain_always = False

  def make_selector(self, env, k: int, tag: int):
    raise NotImplementedError

  def feed(self, env, selector, keys, rows, store, params_extra) -> None:
    raise NotImplementedError

  def prepare(self, env) -> Any:
    return None

  def select(self, env, k, num_candidates):
    names = sorted(env.stores)
    sizes = {d: env.stores[d].num_rows for d in names}
    num_candidates = max(int(num_candidates), self.min_candidates(int(k), env.cfg))
    cands = draw_candidates(sizes, num_candidates, env.seed)
    extra = self.prepare(env)
    if env.cfg.stratify or self.per_domain_always:
      quotas = split_quota(k, sizes)
      selectors = {d: self.make_selector(env, quotas[d], _tag(d)) for d in names}
    else:
      shared = self.make_selector(env, k, 0)
      selectors = {d: shared for d in names}
    for i, d in enumerate(names):
      self.feed(env, selectors[d], i, cands[d], env.stores[d], extra)
    rows, scores, peak = {}, {}, 0
    for sel in {id(s): s for s in selectors.values()}.values():
      keys, sc = sel.result()
      dom, row = streaming.unpack_key(keys)
      for i, d in enumerate(names):
        m = dom == i
        rows[d] = np.concatenate([rows.get(d, np.zeros((0,), np.int64)), row[m]])
        scores[d] = np.concatenate([scores.get(d, np.zeros((0,))), sc[m]])
      peak += sel.peak_held
    return Selection(rows, scores, candidates=int(sum(c.size for c in cands.values())),
                     peak_held=peak, info=self.info(selectors))

  def info(self, selectors) -> dict:
    return {}


class TeacherLoss(_Scored):
  name = "teacher_loss"

  def make_selector(self, env, k, tag):
    c = env.cfg
    return streaming.QuantileBand(k, c.band_low, c.band_high, c.sketch_rows, env.seed + tag)

  def feed(self, env, selector, dom, rows, store, extra):
    for rows_B, loss_B, _ in env.scorer.stream(env.params, store, rows):
      selector.add(streaming.pack_key(np.full(rows_B.size, dom), rows_B), loss_B)

  def min_candidates(self, k, cfg):
    return int(np.ceil(k / (cfg.band_high - cfg.band_low)))

  def info(self, selectors):
    return {"band_thresholds": {d: s.thresholds for d, s in selectors.items()}}


class DRO(_Scored):
  """A Gumbel-top-k draw ~ exp(M's loss / dro_temperature) (see dro.py); one forward each."""
  name = "dro"

  def make_selector(self, env, k, tag):
    return streaming.TopK(k)

  def feed(self, env, selector, dom, rows, store, extra):
    rng = _rng(env.seed, dom, 0x64726F)
    for rows_B, loss_B, _ in env.scorer.stream(env.params, store, rows):
      selector.add(streaming.pack_key(np.full(rows_B.size, dom), rows_B),
                   dro_lib.gumbel_keys(loss_B, env.cfg.dro_temperature, rng))


class Forgetting(_Scored):
  name = "forgetting"
  forwards_per_candidate = 2.0

  def fixed_flops(self, cfg, batch_rows, seq_len, train_flops_tok):
    return cfg.lookahead_steps * batch_rows * seq_len * train_flops_tok

  def make_selector(self, env, k, tag):
    return streaming.TopK(k)

  def prepare(self, env):
    if env.new_batches is None:
      raise ValueError("replay.strategy='forgetting' needs T batches for the look-ahead step")
    return env.scorer.lookahead(env.params, env.new_batches(env.cfg.lookahead_steps),
                                env.lookahead_lr)

  def feed(self, env, selector, dom, rows, store, ahead_params):
    before = env.scorer.stream(env.params, store, rows)
    after = env.scorer.stream(ahead_params, store, rows)
    for (rows_B, loss0_B, _), (_, loss1_B, _) in zip(before, after):
      selector.add(streaming.pack_key(np.full(rows_B.size, dom), rows_B), loss1_B - loss0_B)


class Diversity(_Scored):
  name = "diversity"
  per_domain_always = True

  def make_selector(self, env, k, tag):
    return streaming.KCenterCoreset(k, env.cfg.coreset_factor)

  def feed(self, env, selector, dom, rows, store, extra):
    for rows_B, _, pooled_BxD in env.scorer.stream(env.params, store, rows):
      x = pooled_BxD / np.maximum(np.linalg.norm(pooled_BxD, axis=1, keepdims=True), 1e-9)
      selector.add(streaming.pack_key(np.full(rows_B.size, dom), rows_B), x)


class Gradient(_Scored):
  """Top-k of -<G_i, U>: the rows whose loss a step along T's last-layer gradient U raises
  most (see gradient.py). Cost: T's gradient on `grad_batches` batches (fixed), then per
  candidate its forward plus a matmul the size of the unembedding (at most one more
  forward: the planner counts 2; the Scorer counts what ran)."""
  name = "gradient"
  forwards_per_candidate = 2.0

  def fixed_flops(self, cfg, batch_rows, seq_len, train_flops_tok):
    # A forward plus the unembedding-sized h e^T per T token: at most 2 of training's 3.
    return cfg.grad_batches * batch_rows * seq_len * train_flops_tok * 2 / 3

  def make_selector(self, env, k, tag):
    return streaming.TopK(k)

  def prepare(self, env):
    if env.new_batches is None:
      raise ValueError("replay.strategy='gradient' needs T batches for T's gradient")
    fns = gradient_lib.Alignment(env.scorer.model)
    u_DxV = gradient_lib.t_direction(env.scorer, fns, env.params,
                                     env.new_batches(env.cfg.grad_batches), env.cfg.grad_sign)
    return fns, u_DxV

  def feed(self, env, selector, dom, rows, store, extra):
    fns, u_DxV = extra
    for rows_B, (dot_B,) in env.scorer.map(fns.alignment, env.params, store, rows, u_DxV):
      selector.add(streaming.pack_key(np.full(rows_B.size, dom), rows_B),
                   -np.asarray(dot_B, np.float64))
    env.scorer.extra_flops += (np.size(rows) * env.scorer.seq_len
                               * gradient_lib.candidate_flops_per_token(u_DxV))


class Online(Strategy):
  """The initial buffer; refreshes are done by manager.OnlineBuffer during training."""
  name = "online"

  def select(self, env, k, num_candidates):
    base = Random() if env.cfg.online_init == "random" else Proportional()
    return base.select(env, k, num_candidates)


class Steered(Online):
  """The initial buffer (as online); refreshes by steer.SteeredBuffer, at zero FLOPs."""
  name = "steered"
  runs_forwards = False


REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Random, Proportional, TeacherLoss, Forgetting, Diversity, Gradient,
                              DRO, Online, Steered)}


def get(name: str) -> Strategy:
  if name not in REGISTRY:
    raise ValueError(f"replay.strategy={name!r}; expected one of {sorted(REGISTRY)}")
  return REGISTRY[name]()
