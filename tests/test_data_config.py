"""config.data: defaults, validation naming the key, roles and weights."""

import numpy as np
import pytest

from cpt_jax.schema import data as config_lib


def cfg(**kw):
  c = config_lib.default_data_config()
  c.new = "a"
  for k, v in kw.items():
    c[k] = v
  return c


def test_defaults_valid_and_add():
  import ml_collections
  root = ml_collections.ConfigDict()
  config_lib.add_data_config(root)
  assert root.data.vocab == "byte" and root.data.source == "jsonl"
  config_lib.validate_data_config(cfg())


@pytest.mark.parametrize("key,value", [("source", "csv"), ("on_bad_line", "ignore"),
                                       ("seq_len", 0), ("prefetch", -1), ("vocab", "/no/such.model"),
                                       ("weights", "a=x"), ("weights", "a"), ("new", "")])
def test_invalid_field_names_key(key, value):
  with pytest.raises(ValueError, match=f"data.{key}"):
    config_lib.validate_data_config(cfg(**{key: value}))


def test_roles_explicit_then_patterns():
  c = cfg(new="m1", replay="*", distill="m2", eval="x*")
  roles = config_lib.resolve_roles(c, ["m1", "m2", "m3", "x1"])
  assert roles == {"m1": "new", "m2": "distill", "m3": "replay", "x1": "replay"}
  c = cfg(new="m1", replay="m*", eval="*")
  assert config_lib.resolve_roles(c, ["m1", "m2", "z"]) == {"m1": "new", "m2": "replay",
                                                          "z": "eval"}
  with pytest.raises(ValueError, match="data.replay"):
    config_lib.resolve_roles(cfg(new="a", replay="a"), ["a"])
  with pytest.raises(ValueError, match="pattern"):
    config_lib.resolve_roles(cfg(replay="*"), None)


def test_weights_spec():
  doms, roles = ["a", "b", "c", "e"], ["new", "replay", "replay", "eval"]
  w = config_lib.weights_from_spec("", doms, roles, [10, 20, 30, 40])
  np.testing.assert_array_equal(w, [10, 20, 30, 0])
  w = config_lib.weights_from_spec("a=2,*=0.5", doms, roles, [1] * 4)
  np.testing.assert_array_equal(w, [2, 0.5, 0.5, 0])
  with pytest.raises(ValueError, match="no weight for domain 'c'"):
    config_lib.weights_from_spec("a=1,b=1", doms, roles, [1] * 4)
  with pytest.raises(ValueError, match="'zz' matches no domain"):
    config_lib.weights_from_spec("zz=1,*=1", doms, roles, [1] * 4)


@pytest.mark.parametrize("w,msg", [([1, np.nan, 1, 0], "domain 'b' is not finite"),
                                   ([1, np.inf, 1, 0], "domain 'b' is not finite"),
                                   ([1, 1, -1, 0], "domain 'c' is negative"),
                                   ([0, 0, 0, 0], "sum to 0"),
                                   ([1, 1, 1, 2], "domain 'e' has role eval"),
                                   ([1, 1], "expected 4 weights")])
def test_invalid_weights_name_domain(w, msg):
  with pytest.raises(ValueError, match=msg):
    config_lib.check_weights(np.array(w, float), ["a", "b", "c", "e"],
                             ["new", "replay", "replay", "eval"])


def test_import_is_cheap():
  import subprocess
  import sys
  code = ("import sys, cpt_jax.data; "
          "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules, 'heavy import'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
