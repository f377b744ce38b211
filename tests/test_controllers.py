"""Mixing controllers on synthetic loss sequences: distributions, floors, shares, resume."""

import json
import math

import numpy as np
import pytest

from cpt_jax import mixing
from cpt_jax.mixing import constraints

DOMAINS = ["ev", "new_a", "new_b", "old_a", "old_b", "old_c"]
ROLES = ["eval", "new", "new", "replay", "replay", "distill"]
W0 = np.array([0.0, 2.0, 1.0, 1.0, 1.0, 1.0])
REF = {"new_a": 2.0, "new_b": 2.0, "old_a": 1.5, "old_b": 1.5, "old_c": 1.5}
ADAPTIVE = ("doremi", "exp3", "forgetting")
ALL = ("static", "schedule") + ADAPTIVE
NEW = np.array([r == "new" for r in ROLES])
REP = np.array([r in ("replay", "distill") for r in ROLES])


def make_cfg(controller, **kw):
  cfg = mixing.default_mixing_config()
  cfg.controller = controller
  cfg.update_every = 10
  cfg.floor = 0.01
  if controller == "schedule":
    cfg.schedule = "0:new_*=1,old_a=1;20:new_a=1,old_*=0.5"
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def losses(t, rising="old_b", rate=0.1):
  """Training losses at update t: flat at the reference + 0.05, one domain rising."""
  out = {d: v + 0.05 for d, v in REF.items()}
  out[rising] = REF[rising] + 0.05 + rate * t
  return out


def run(cfg, n, state=None, start=1, rising="old_b"):
  state = state or mixing.init_state(cfg, DOMAINS, ROLES, W0)
  ws = []
  for t in range(start, start + n):
    state, w = mixing.update(cfg, state, t * cfg.update_every, losses(t, rising), REF)
    ws.append(w)
  return state, ws


def check_distribution(w, floor):
  assert w.shape == (len(DOMAINS),)
  assert math.isclose(w.sum(), 1.0, abs_tol=1e-12)
  assert w[0] == 0.0  # eval
  assert np.all(w[1:] >= floor - 1e-15)


class FakePipeline:
  domains, roles = DOMAINS, ROLES

  def __init__(self):
    self.weights = W0.copy()
    self.calls = []

  def set_weights(self, w):
    self.weights = np.asarray(w, np.float64)
    self.calls.append(self.weights)


# -- config -------------------------------------------------------------------
@pytest.mark.parametrize("controller", ALL)
def test_defaults_validate(controller):
  mixing.validate_mixing_config(make_cfg(controller), DOMAINS, ROLES, log_every=10)


@pytest.mark.parametrize("key,value,match", [
    ("controller", "odm", "mixing.controller"),
    ("update_every", 0, "mixing.update_every"),
    ("floor", -0.1, "mixing.floor"),
    ("floor", 0.3, r"mixing.floor: 0.3 x 5"),
    ("smoothing", 1.5, "mixing.smoothing"),
    ("doremi_lr", float("nan"), "mixing.doremi_lr"),
    ("exp3_schedule", "linear", "mixing.exp3_schedule"),
    ("exp3_eps", 2.0, "mixing.exp3_eps"),
    ("exp3_reward_decay", 1.0, "mixing.exp3_reward_decay"),
    ("new_min_share", 1.2, "mixing.new_min_share"),
    ("max_old_share", -1.0, "mixing.max_old_share"),
    ("replay_budget", 1.5, "mixing.replay_budget"),  # deprecated, still checked
    ("forgetting_gain", -1.0, "mixing.forgetting_gain"),
])
def test_validation_names_key(key, value, match):
  cfg = make_cfg("doremi")
  cfg[key] = value
  with pytest.raises(ValueError, match=match):
    mixing.validate_mixing_config(cfg, DOMAINS, ROLES)


def test_validation_of_shares_and_log_every():
  cfg = make_cfg("forgetting", floor=0.1, max_old_share=0.2)
  with pytest.raises(ValueError, match="mixing.max_old_share"):
    mixing.validate_mixing_config(cfg, DOMAINS, ROLES)
  cfg = make_cfg("forgetting", floor=0.15, new_min_share=0.6)
  with pytest.raises(ValueError, match="mixing.new_min_share"):
    mixing.validate_mixing_config(cfg, DOMAINS, ROLES)
  with pytest.raises(ValueError, match="needs at least one domain with role new"):
    mixing.validate_mixing_config(make_cfg("forgetting"), ["a", "b"], ["replay", "replay"])
  with pytest.raises(ValueError, match="mixing.update_every: 10 is not a multiple"):
    mixing.validate_mixing_config(make_cfg("doremi"), log_every=4)


@pytest.mark.parametrize("spec,match", [
    ("", "is empty"),
    ("10:new_a=1", "must start at step 0"),
    ("0:new_a=1;20:new_a=1;20:new_b=1", "increase strictly"),
    ("0:new_a=x", "not a number"),
    ("0:new_a", "not name=weight"),
    ("a:new_a=1", "not an integer step"),
    ("0:new_a=1;15:new_b=1", "not a multiple of mixing.update_every"),
    ("0:nope=1", "'nope' .* matches no trainable domain"),
    ("0:ev=1,new_a=1", "role eval"),
    ("0:new_a=0", "weight 0"),
    ("0:new_a=-1", ">= 0"),
])
def test_schedule_errors(spec, match):
  cfg = make_cfg("schedule", schedule=spec)
  with pytest.raises(ValueError, match="mixing.schedule: .*" + match):
    mixing.validate_mixing_config(cfg, DOMAINS, ROLES)


# -- every controller ---------------------------------------------------------
@pytest.mark.parametrize("controller", ALL)
def test_weights_are_a_distribution_above_the_floor(controller):
  cfg = make_cfg(controller)
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  check_distribution(np.asarray(state["weights"]), cfg.floor if controller in ADAPTIVE else 0.0)
  _, ws = run(cfg, 30, state, rising="old_c")
  for w in ws:
    check_distribution(w, cfg.floor if controller in ADAPTIVE else 0.0)


@pytest.mark.parametrize("controller", ALL)
def test_json_round_trip_continues_bit_exact(controller):
  cfg = make_cfg(controller)
  _, ws_straight = run(cfg, 12)
  state, ws_a = run(cfg, 5)
  state = json.loads(json.dumps(state))
  _, ws_b = run(cfg, 7, state, start=6)
  assert len(ws_a + ws_b) == len(ws_straight)
  for x, y in zip(ws_a + ws_b, ws_straight):
    assert np.array_equal(x, y)


@pytest.mark.parametrize("controller", ADAPTIVE)
def test_controller_resume_mid_window_is_bit_exact(controller):
  """Checkpoint between two updates (window half accumulated), restore, continue."""
  cfg = make_cfg(controller)

  def records(lo, hi):
    for step in range(lo, hi, 5):  # log_every 5, update_every 10
      yield step, {"domain_loss": losses(step / 10), "domain_tokens": {d: 100 + step for d in REF}}

  a = mixing.Controller(cfg, DOMAINS, ROLES, W0)
  a.set_reference(REF)
  traj_a = [a.maybe_update(s, r) for s, r in records(5, 100)]
  b = mixing.Controller(cfg, DOMAINS, ROLES, W0)
  b.set_reference(REF)
  traj_b = [b.maybe_update(s, r) for s, r in records(5, 50)]
  saved = json.loads(json.dumps(b.state_dict()))
  assert saved["window"]  # step 45: a half-full window
  c = mixing.Controller(cfg, DOMAINS, ROLES, W0)
  c.load_state_dict(saved)
  c.set_reference({d: 0.0 for d in REF})  # ignored: the checkpointed reference wins
  traj_b += [c.maybe_update(s, r) for s, r in records(50, 100)]
  assert traj_a == traj_b
  assert sum(x is not None for x in traj_a) == 9


# -- rising loss gains weight -------------------------------------------------
@pytest.mark.parametrize("controller", ADAPTIVE)
@pytest.mark.parametrize("rising", ["old_a", "old_c"])
def test_domain_whose_loss_rises_gains_weight(controller, rising):
  cfg = make_cfg(controller)
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  i = DOMAINS.index(rising)
  w0 = state["weights"][i]
  _, ws = run(cfg, 8, state, rising=rising)
  others = [j for j in range(1, len(DOMAINS)) if j != i and ROLES[j] != "new"]
  assert ws[-1][i] > w0
  assert ws[-1][i] > max(ws[-1][j] for j in others)
  if controller != "exp3":  # exp3 moves by its exploration schedule, not monotonically
    assert all(b[i] >= a[i] for a, b in zip(ws, ws[1:]))


def test_doremi_ignores_domains_at_or_below_the_reference():
  cfg = make_cfg("doremi")
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  flat = {d: v - 0.1 for d, v in REF.items()}  # all below the teacher: excess 0
  state, w = mixing.update(cfg, state, 10, flat, REF)
  np.testing.assert_allclose(w, state["weights"])
  # Missing domains keep their excess; domains missing from the reference have excess 0.
  state, _ = mixing.update(cfg, state, 20, {"old_a": 3.0}, REF)
  assert state["excess"][DOMAINS.index("old_a")] == pytest.approx(1.5)
  state, _ = mixing.update(cfg, state, 30, {"new_a": 9.0}, {"old_a": 1.0})
  assert state["excess"][DOMAINS.index("old_a")] == pytest.approx(1.5)
  assert state["excess"][DOMAINS.index("new_a")] == 0.0


# -- exp3 ---------------------------------------------------------------------
def test_exp3_exploration_follows_the_odm_schedule():
  cfg = make_cfg("exp3", floor=0.0, new_min_share=0.0, max_old_share=1.0)  # ODM, unconstrained
  k = 5
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  assert state["eps"] == min(1 / k, math.sqrt(math.log(k) / k))
  for n in range(1, 100):  # an update every 10 steps; ODM's round t is the step
    state, w = mixing.update(cfg, state, 10 * n, losses(n % 7), REF)
    eps = min(1 / k, math.sqrt(math.log(k) / (k * (10 * n + 1))))
    assert state["eps"] == eps == mixing.exp3_exploration(cfg, 10 * n + 1, k)
    assert w[1:].min() >= eps - 1e-15  # every arm keeps at least eps
  assert state["eps"] < 1 / k  # the 1/K cap binds early, the sqrt decay later
  assert mixing.exp3_exploration(cfg, 1, 1) == 0.0
  cfg.exp3_schedule, cfg.exp3_eps = "constant", 0.03
  assert [mixing.exp3_exploration(cfg, t, k) for t in (1, 10, 1000)] == [0.03] * 3
  cfg.exp3_eps = 0.9
  assert mixing.exp3_exploration(cfg, 3, k) == 1 / k


def test_exp3_reward_is_a_moving_average_of_the_window_loss():
  cfg = make_cfg("exp3", floor=0.0, exp3_reward_decay=0.5)
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  new, _ = mixing.update(cfg, state, 10, {"old_a": 2.0}, REF)
  i = DOMAINS.index("old_a")
  assert new["reward"][i] == 1.0  # 0.5 * 0 + 0.5 * 2.0
  assert new["reward"][DOMAINS.index("old_b")] == 0.0  # not observed: kept
  new, _ = mixing.update(cfg, new, 20, {"old_a": 3.0}, REF)
  assert new["reward"][i] == 2.0  # 0.5 * 1.0 + 0.5 * 3.0


def test_exp3_reward_does_not_depend_on_the_sampling_share():
  """Every domain's window loss is observed, so equal losses give equal rewards."""
  domains, roles = ["t", "u", "old"], ["new", "new", "replay"]
  cfg = make_cfg("exp3", floor=0.0, exp3_reward_decay=0.5, new_min_share=0.0,
                 max_old_share=1.0)
  state = mixing.init_state(cfg, domains, roles, [0.5, 0.49, 0.01])
  assert state["weights"] == pytest.approx([0.5, 0.49, 0.01])  # the shares sampled from
  new, _ = mixing.update(cfg, state, 10, {"t": 2.0, "u": 3.0, "old": 2.0})
  assert new["reward"] == [1.0, 1.5, 1.0]  # 0.5 * loss each, whatever the share
  # Capped to a 1% replay share, the replay domain's reward is still its loss.
  cfg = make_cfg("exp3", floor=0.0, exp3_reward_decay=0.5, max_old_share=0.01,
                 new_min_share=0.99)
  state = mixing.init_state(cfg, domains, roles, [1.0, 1.0, 1.0])
  assert state["weights"][2] == pytest.approx(0.01)
  new, _ = mixing.update(cfg, state, 10, {"t": 2.0, "u": 2.0, "old": 2.0})
  assert new["reward"] == [1.0, 1.0, 1.0]


# -- the max old share (every adaptive controller) ----------------------------
def old_share_cap(cfg):
  return min(cfg.max_old_share, 1 - max(cfg.new_min_share, NEW.sum() * cfg.floor))


def random_losses(rng):
  """Losses around the reference, some missing or NaN, replay sometimes far above it."""
  out = {}
  for d, ref in REF.items():
    u = rng.random()
    if u < 0.1:
      continue  # not seen in the window
    v = ref + rng.normal(0.0, 0.5)
    if d.startswith("old") and u > 0.5:
      v += rng.exponential(50.0)  # huge excess on a replay/distill domain
    out[d] = float("nan") if u > 0.97 else v
  return out


@pytest.mark.parametrize("controller", ADAPTIVE)
@pytest.mark.parametrize("max_old,new_min", [(0.5, 0.5), (0.05, 0.95), (0.3, 0.5), (0.8, 0.1),
                                             (1.0, 0.0)])
def test_adaptive_weights_stay_within_the_max_old_share(controller, max_old, new_min):
  def trajectory(cfg):
    rng = np.random.default_rng(1234)
    state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
    ws = [np.asarray(state["weights"])]
    for t in range(1, 51):
      state, w = mixing.update(cfg, state, 10 * t, random_losses(rng), REF)
      ws.append(w)
    return ws

  cfg = make_cfg(controller, max_old_share=max_old, new_min_share=new_min, doremi_lr=2.0)
  cap = old_share_cap(cfg)
  ws = trajectory(cfg)
  for w in ws:
    check_distribution(w, cfg.floor)
    assert w[REP].sum() <= cap + 1e-12
    assert w[NEW].sum() >= new_min - 1e-12
  free = trajectory(make_cfg(controller, max_old_share=1.0, new_min_share=0.0, doremi_lr=2.0))
  if max(w[REP].sum() for w in free) > cap:  # the cap binds where it would be passed
    assert max(w[REP].sum() for w in ws) == pytest.approx(cap)


def test_within_old_share_matches_a_hand_computation():
  cfg = make_cfg("doremi", max_old_share=0.4, new_min_share=0.5)
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  w = np.array([0.0, 0.3, 0.1, 0.3, 0.2, 0.1])
  got = constraints.within_max_old_share(w, state, cfg)
  r = (0.4 - 0.03) / (0.6 - 0.03)  # cap 0.4, R sums to 0.6, 3 floors of 0.01
  want = [0.0, 0.3 + 0.2 * 0.29 / 0.38, 0.1 + 0.2 * 0.09 / 0.38,
          0.01 + 0.29 * r, 0.01 + 0.19 * r, 0.01 + 0.09 * r]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
  # Within the cap nothing moves; mass never goes from N to R.
  for inside in ([0.0, 0.45, 0.2, 0.15, 0.1, 0.1], [0.0, 0.3, 0.3, 0.2, 0.1, 0.1]):
    np.testing.assert_array_equal(constraints.within_max_old_share(np.array(inside), state, cfg),
                                  inside)
  # N all at the floor: the freed mass is split uniformly.
  got = constraints.within_max_old_share(np.array([0.0, 0.01, 0.01, 0.5, 0.3, 0.18]), state, cfg)
  assert got[1] == got[2] == pytest.approx(0.01 + (0.98 - 0.4) / 2)


def forgetting_old_domains(t):
  """New domains at the reference, replay/distill far above it."""
  return {d: REF[d] + (5.0 if d.startswith("old") else 0.0) for d in REF}


# Configured mix: 95% new, 5% replay + distill.
W0_5 = np.array([0.0, 0.6, 0.35, 0.02, 0.02, 0.01])


@pytest.mark.parametrize("controller", ["doremi", "exp3"])
def test_max_old_share_binds_doremi_and_exp3(controller):
  """Old domains far above the teacher pull DoReMi/exp3 to replay, the cap holds them."""
  def replay_shares(**kw):
    cfg = make_cfg(controller, floor=1e-3, **kw)
    state = mixing.init_state(cfg, DOMAINS, ROLES, W0_5)
    shares = [np.asarray(state["weights"])[REP].sum()]
    for t in range(1, 21):
      state, w = mixing.update(cfg, state, 10 * t, forgetting_old_domains(t), REF)
      shares.append(w[REP].sum())
      assert w[NEW].sum() >= kw["new_min_share"] - 1e-12
    return np.array(shares)

  free = replay_shares(max_old_share=1.0, new_min_share=0.0)
  assert free.max() > 0.5  # unconstrained, replay takes most of the mixture
  held = replay_shares(max_old_share=0.05, new_min_share=0.95)
  assert np.all(held <= 0.05 + 1e-12)
  assert held[-1] == pytest.approx(0.05)


@pytest.mark.parametrize("controller", ADAPTIVE)
def test_share_feasibility_is_validated_for_every_adaptive_controller(controller):
  with pytest.raises(ValueError, match="mixing.max_old_share"):
    mixing.init_state(make_cfg(controller, floor=0.1, max_old_share=0.2), DOMAINS, ROLES, W0)
  with pytest.raises(ValueError, match="mixing.new_min_share"):
    mixing.init_state(make_cfg(controller, floor=0.15, new_min_share=0.6), DOMAINS, ROLES, W0)
  if controller == "forgetting":
    return
  only_old = (["a", "b"], ["replay", "distill"])
  with pytest.raises(ValueError, match="mixing.max_old_share: .* needs a domain with role new"):
    mixing.init_state(make_cfg(controller), *only_old, [1.0, 1.0])
  cfg = make_cfg(controller, max_old_share=1.0, new_min_share=0.0)
  np.testing.assert_allclose(mixing.init_state(cfg, *only_old, [1.0, 3.0])["weights"],
                             [0.01 + 0.98 * 0.25, 0.01 + 0.98 * 0.75])
  # A role-new domain with weight 0 is not controlled: nothing can take the freed mass.
  with pytest.raises(ValueError, match="mixing.max_old_share: .* no role-new domain"):
    mixing.init_state(make_cfg(controller), DOMAINS, ROLES, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])


# -- forgetting ---------------------------------------------------------------
@pytest.mark.parametrize("max_old,new_min", [(0.3, 0.5), (0.5, 0.7), (0.8, 0.1)])
def test_forgetting_respects_new_min_share_and_max_old_share(max_old, new_min):
  cfg = make_cfg("forgetting", max_old_share=max_old, new_min_share=new_min, forgetting_gain=5.0)
  new = np.array([r == "new" for r in ROLES])
  rep = np.array([r in ("replay", "distill") for r in ROLES])
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  for t in range(1, 20):
    big = {d: REF[d] + (t if d.startswith("old") else -1.0) for d in REF}
    state, w = mixing.update(cfg, state, 10 * t, big, REF)
    check_distribution(w, cfg.floor)
    assert w[rep].sum() <= min(max_old, 1 - new_min) + 1e-12
    assert w[new].sum() >= new_min - 1e-12
  assert w[rep].sum() == pytest.approx(min(max_old, 1 - new_min))  # large excess: at the cap
  # The new domains split their share by configured weight (2:1), above the floor.
  assert (w[1] - cfg.floor) == pytest.approx(2 * (w[2] - cfg.floor))


def test_forgetting_without_excess_keeps_the_configured_mix():
  cfg = make_cfg("forgetting", floor=0.0, max_old_share=1.0, new_min_share=0.0)
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  np.testing.assert_allclose(state["weights"], W0 / W0.sum())
  state, w = mixing.update(cfg, state, 10, {d: v - 0.2 for d, v in REF.items()}, REF)
  np.testing.assert_allclose(w, W0 / W0.sum())
  # excess 0.5 on old_a at gain 1 adds 0.5 to its base 1/6, then the rest renormalises.
  _, w = mixing.update(cfg, state, 20, {"old_a": REF["old_a"] + 0.5}, REF)
  assert w[3] == pytest.approx(1 / 6 + 0.5)


# -- schedule and the Controller wrapper --------------------------------------
def test_schedule_switches_exactly_at_boundaries():
  cfg = make_cfg("schedule", update_every=10, schedule="0:new_a=1,old_a=3;20:new_b=1;40:*=1")
  ctl = mixing.Controller(cfg, DOMAINS, ROLES, W0)
  pipe = FakePipeline()
  ctl.start(pipe)
  np.testing.assert_array_equal(pipe.weights, [0, 0.25, 0, 0.75, 0, 0])
  got = {}
  for step in range(5, 60, 5):  # log_every 5
    if ctl.maybe_update(step, {"domain_loss": {}}, pipe) is not None:
      got[step] = pipe.weights.copy()
  assert sorted(got) == [10, 20, 30, 40, 50]
  np.testing.assert_array_equal(got[10], [0, 0.25, 0, 0.75, 0, 0])
  np.testing.assert_array_equal(got[20], [0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(got[30], got[20])
  np.testing.assert_array_equal(got[40], [0, 0.2, 0.2, 0.2, 0.2, 0.2])
  for step in (0, 19, 20, 39, 40, 10**6):
    want = 0 if step < 20 else 20 if step < 40 else 40
    np.testing.assert_array_equal(mixing.schedule_weights(cfg, DOMAINS, ROLES, step),
                                  mixing.schedule_weights(cfg, DOMAINS, ROLES, want))


def test_controller_acts_only_every_update_every_and_static_never():
  pipe = FakePipeline()
  static = mixing.Controller(make_cfg("static"), DOMAINS, ROLES, W0)
  static.start(pipe)
  assert static.maybe_update(10, {"domain_loss": losses(1)}, pipe) is None
  assert not pipe.calls
  ctl = mixing.Controller(make_cfg("doremi", update_every=20), DOMAINS, ROLES, W0)
  out = [ctl.maybe_update(s, {"domain_loss": losses(s)}, pipe, REF) for s in (10, 20, 25, 40)]
  assert [o is not None for o in out] == [False, True, False, True]
  assert len(pipe.calls) == 2 and ctl.state["updates"] == 2
  assert set(out[1]) == set(DOMAINS)
  np.testing.assert_array_equal(pipe.weights, ctl.weights)
  assert ctl.metrics()["mixing/updates"] == 2.0
  assert ctl.seconds > 0


def test_window_is_token_weighted():
  cfg = make_cfg("forgetting")
  state = mixing.init_state(cfg, DOMAINS, ROLES, W0)
  state = mixing.accumulate(state, {"old_a": 2.0, "old_b": float("nan")}, {"old_a": 300})
  state = mixing.accumulate(state, {"old_a": 4.0}, {"old_a": 100})
  assert mixing.window_loss(state) == {"old_a": 2.5}


def test_load_state_dict_rejects_another_run():
  ctl = mixing.Controller(make_cfg("doremi"), DOMAINS, ROLES, W0)
  other = mixing.Controller(make_cfg("exp3"), DOMAINS, ROLES, W0)
  with pytest.raises(ValueError, match="controller 'exp3'"):
    ctl.load_state_dict(other.state_dict())
  state = ctl.state_dict()
  state["domains"] = DOMAINS[::-1]
  with pytest.raises(ValueError, match="domains"):
    ctl.load_state_dict(state)
  with pytest.raises(ValueError, match="controller 'doremi'"):
    mixing.update(make_cfg("exp3"), ctl.state_dict(), 10, {}, {})


def test_zero_weight_and_eval_domains_stay_off():
  w0 = W0.copy()
  w0[DOMAINS.index("old_b")] = 0.0
  for controller in ADAPTIVE:
    cfg = make_cfg(controller)
    state = mixing.init_state(cfg, DOMAINS, ROLES, w0)
    _, ws = run(cfg, 5, state, rising="old_b")
    assert all(w[DOMAINS.index("old_b")] == 0.0 and w[0] == 0.0 for w in ws)


@pytest.mark.parametrize("controller", ALL)
def test_overhead_benchmark(controller):
  sec = mixing.controller_overhead_seconds(make_cfg(controller), num_domains=200, iters=5)
  assert 0.0 <= sec < 0.05
