"""Renamed config keys: `replay.budget` -> `replay.fraction` / `replay.tokens` and
`mixing.replay_budget` -> `mixing.max_old_share`, kept for one release with a warning."""

import contextlib
import warnings

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax import mixing
from cpt_jax.replay import planner
from cpt_jax.replay import strategies
from cpt_jax.schema import deprecated
from tests.conftest import REPO
from tests.helpers import tiny_config


def _validated(**replay):
  c = tiny_config()
  c.replay.update(strategy="random", **replay)
  config_lib.validate_config(c)
  return c


def _plan(rcfg):
  return planner.plan(rcfg=rcfg, steps=100, batch=8, seq_len=32,
                      weights={"t": 1.0, "a": 1.0}, roles={"t": "new", "a": "replay"},
                      pool_sizes={"a": 4000}, f_train=3e6, f_fwd=1e6,
                      strategy=strategies.get(rcfg.strategy), lambda_kd=0.0,
                      flops_per_second=1e10)


@pytest.mark.parametrize("old,new,key", [(0.02, {"fraction": 0.02}, "fraction"),
                                         (1.0, {"fraction": 1.0}, "fraction"),
                                         (5000.0, {"tokens": 5000.0}, "tokens"),
                                         (5000, {"tokens": 5000}, "tokens")])
def test_replay_budget_gives_the_plan_of_its_new_key(old, new, key):
  with pytest.warns(DeprecationWarning, match=rf"replay.budget is deprecated .*replay.{key}="):
    c_old = _validated(budget=old)
  c_new = _validated(**new)
  assert c_old.replay.to_dict() == c_new.replay.to_dict()  # budget back to unset
  assert c_old.replay.budget == deprecated.UNSET and c_old.replay[key] == old
  p_old, p_new = _plan(c_old.replay), _plan(c_new.replay)
  assert p_old == p_new
  if key == "tokens":
    assert p_old["replay_tokens"] == pytest.approx(5000.0)
  else:
    assert p_old["replay_tokens"] == pytest.approx(old * p_old["t_tokens"])


def test_validating_twice_warns_once_and_keeps_the_value():
  c = tiny_config()
  c.replay.budget = 0.03
  with pytest.warns(DeprecationWarning):
    config_lib.validate_config(c)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    config_lib.validate_config(c)  # already moved: no warning, no clash
  assert c.replay.fraction == 0.03


@pytest.mark.parametrize("old,new,match", [
    (0.02, {"fraction": 0.1}, r"replay.budget=0.02 \(deprecated\) and replay.fraction=0.1"),
    (5000.0, {"tokens": 100.0}, r"replay.budget=5000.0 \(deprecated\) and replay.tokens=100.0"),
    (0.02, {"tokens": 100.0}, r"replay.budget=0.02 \(deprecated\) and replay.tokens=100.0"),
])
def test_old_and_new_replay_keys_together_are_an_error(old, new, match):
  with pytest.raises(ValueError, match=match):
    _validated(budget=old, **new)


def test_fraction_and_tokens_together_are_an_error():
  with pytest.raises(ValueError, match=r"replay.fraction=0.1 and replay.tokens=5000.0 are both"):
    _validated(fraction=0.1, tokens=5000.0)
  _validated(fraction=0.05, tokens=5000.0)  # fraction at its default: tokens alone


@pytest.mark.parametrize("replay,match", [
    ({"fraction": 0.0}, "replay.fraction=0.0 must be in"),
    ({"fraction": 2.0}, "replay.fraction=2.0 must be in"),
    ({"tokens": -1.0}, "replay.tokens=-1.0 must be 0"),
    ({"tokens": 0.5}, "replay.tokens=0.5 must be 0"),
    ({"budget": 0.0}, r"replay.budget=0.0 \(deprecated\) must be > 0"),
    ({"budget": -2.0}, r"replay.budget=-2.0 \(deprecated\) must be > 0"),
])
def test_replay_amount_validation_names_the_key(replay, match):
  with pytest.raises(ValueError, match=match):
    _validated(**replay)


def _mixing_cfg(**kw):
  cfg = mixing.default_mixing_config()
  cfg.update(controller="doremi", update_every=10, floor=0.01, new_min_share=0.5, **kw)
  return cfg


def test_mixing_replay_budget_gives_the_max_old_share_constraint():
  domains, roles = ["t", "u", "a", "b"], ["new", "new", "replay", "distill"]
  w0 = [1.0, 1.0, 3.0, 3.0]  # the old domains want 75%: the cap binds
  old, new = _mixing_cfg(replay_budget=0.2), _mixing_cfg(max_old_share=0.2)
  with pytest.warns(DeprecationWarning, match="mixing.replay_budget is deprecated"):
    s_old = mixing.init_state(old, domains, roles, w0)
  s_new = mixing.init_state(new, domains, roles, w0)
  assert old.max_old_share == 0.2 and old.replay_budget == deprecated.UNSET
  assert s_old == s_new
  assert sum(s_old["weights"][2:]) == pytest.approx(0.2)
  losses = {"t": 2.0, "u": 2.0, "a": 5.0, "b": 5.0}
  _, w_old = mixing.update(old, s_old, 10, losses, {d: 1.0 for d in domains})
  _, w_new = mixing.update(new, s_new, 10, losses, {d: 1.0 for d in domains})
  np.testing.assert_array_equal(w_old, w_new)
  c = tiny_config()
  c.mixing.replay_budget = 0.3
  with pytest.warns(DeprecationWarning):
    config_lib.validate_config(c)
  assert c.mixing.max_old_share == 0.3


def test_old_and_new_mixing_keys_together_are_an_error():
  with pytest.raises(ValueError, match=r"mixing.replay_budget=0.2 \(deprecated\) and "
                     r"mixing.max_old_share=0.3"):
    mixing.validate_mixing_config(_mixing_cfg(replay_budget=0.2, max_old_share=0.3))
  with pytest.raises(ValueError, match="mixing.replay_budget: must be in"):
    mixing.validate_mixing_config(_mixing_cfg(replay_budget=1.5))


def test_the_deprecation_line_is_printed(capsys):
  c = tiny_config()
  c.replay.budget = 0.0123
  with pytest.warns(DeprecationWarning):
    config_lib.validate_config(c)
  err = capsys.readouterr().err
  assert ("replay.budget is deprecated (removed in the next release): use replay.fraction "
          "(<= 1) or replay.tokens (> 1)") in err


def _staged(**stage_replay):
  c = tiny_config()
  c.stage_order = "pretrain,cpt"
  c.stages.pretrain = {"data": {"new": "alpha"}}
  c.stages.cpt = {"init_from": "pretrain", "data": {"new": "beta", "replay": "alpha"},
                  "replay": stage_replay}
  return c


@pytest.mark.parametrize("base,stage,want,base_want", [
    ({}, {"budget": 0.02}, (0.02, 0.0), (0.05, 0.0)),
    ({}, {"budget": 2000.0}, (0.05, 2000.0), (0.05, 0.0)),
    ({"fraction": 0.2}, {"budget": 0.02}, (0.02, 0.0), (0.2, 0.0)),
    ({"tokens": 9000.0}, {"budget": 0.02}, (0.02, 0.0), (0.05, 9000.0)),
    ({"budget": 0.2}, {"tokens": 3000.0}, (0.05, 3000.0), (0.2, 0.0)),
    ({"fraction": 0.2}, {"tokens": 3000.0}, (0.05, 3000.0), (0.2, 0.0)),  # no old key
])
def test_a_stage_replaces_the_base_replay_amount_old_key_or_new(base, stage, want, base_want):
  c = _staged(**stage)
  c.replay.update(**base)
  old = "budget" in base or "budget" in stage
  with pytest.warns(DeprecationWarning) if old else contextlib.nullcontext():
    config_lib.validate_config(c)
  s = config_lib.stage_config(c, "cpt")
  assert (s.replay.fraction, s.replay.tokens, s.replay.budget) == want + (deprecated.UNSET,)
  p = config_lib.stage_config(c, "pretrain")  # the base's amount, moved to its new key
  assert (p.replay.fraction, p.replay.tokens, p.replay.budget) == base_want + (deprecated.UNSET,)
  config_lib.validate_config(s)


def test_a_stage_setting_old_and_new_keys_is_an_error_naming_the_stage():
  c = _staged(budget=0.02, fraction=0.1)
  with pytest.raises(ValueError, match=r"stages.cpt.replay.budget=0.02 \(deprecated\) and "
                     r"stages.cpt.replay.fraction=0.1"):
    config_lib.validate_config(c)
  c = _staged()
  c.stages.cpt.mixing = {"replay_budget": 0.3}
  c.mixing.max_old_share = 0.4  # the base's: the stage's old key replaces it
  with pytest.warns(DeprecationWarning, match="stages.cpt.mixing.replay_budget"):
    s = config_lib.stage_config(c, "cpt")
  assert s.mixing.max_old_share == 0.3 and s.mixing.replay_budget == deprecated.UNSET


def test_command_line_override_of_an_old_key_parses():
  argv = ["prog", f"--config={REPO}/configs/tiny.py", "--config.replay.budget=0.01",
          "--config.mixing.replay_budget=0.25"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)  # as cpt_jax/main.py defines it
  fv(argv)
  c = fv.config
  with pytest.warns(DeprecationWarning):
    config_lib.validate_config(c)  # a locked config is updated in place
  assert c.is_locked
  assert (c.replay.fraction, c.replay.budget) == (0.01, deprecated.UNSET)
  assert c.mixing.max_old_share == 0.25
