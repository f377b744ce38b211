"""Config validation: clear errors naming the key, before anything compiles."""

import subprocess
import sys

import pytest

from cpt_jax import config as config_lib
from cpt_jax import configs
from cpt_jax import main as main_lib
from cpt_jax.configs import llama3_2_1b
from cpt_jax.configs import recipe
from tests.conftest import REPO
from tests.helpers import tiny_config


def test_defaults_validate():
  config_lib.validate_config(tiny_config(), num_devices=8)


def test_unknown_key_is_named_with_suggestion():
  c = tiny_config()
  c.train.learning_rate = 0.1
  with pytest.raises(ValueError, match=r"unknown config key 'train.learning_rate'"):
    config_lib.validate_config(c)
  c = tiny_config()
  c.optimzer = {"lr": 1.0}
  with pytest.raises(ValueError, match=r"'optimzer' \(did you mean 'optimizer'\?\)"):
    config_lib.validate_config(c)


@pytest.mark.parametrize("mesh,match", [
    ((3, 1, 1), "needs 3 devices, but 8 are available"),
    ((-1, 3, 1), "not divisible by 3"),
    ((2, 2), "must have 3 entries"),
    ((-1, -1, 2), "at most one entry may be -1"),
])
def test_bad_mesh(mesh, match):
  c = tiny_config()
  c.sharding.mesh_shape = mesh
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c, num_devices=8)


def test_batch_not_divisible_by_data_parallel_size():
  c = tiny_config(**{"train.global_batch_size": 12})
  c.sharding.mesh_shape = (-1, 1, 1)
  with pytest.raises(ValueError, match=r"train.global_batch_size=12 .* data-parallel size 8"):
    config_lib.validate_config(c, num_devices=8)
  c = tiny_config(**{"train.global_batch_size": 8, "train.grad_accum_steps": 3})
  with pytest.raises(ValueError, match="grad_accum_steps"):
    config_lib.validate_config(c)
  # The scoring batch is sharded the same way (it failed inside JAX without naming a key).
  c = tiny_config(**{"replay.score_batch": 12})
  c.sharding.mesh_shape = (-1, 1, 1)
  with pytest.raises(ValueError, match=r"replay.score_batch=12 .* data-parallel size 8"):
    config_lib.validate_config(c, num_devices=8)
  with pytest.raises(ValueError, match=r"replay.score_batch=-8 must be >= 0"):
    config_lib.validate_config(tiny_config(**{"replay.score_batch": -8}), num_devices=8)


def test_heads_not_divisible_by_tensor_axis():
  c = tiny_config()
  c.model.num_kv_heads = 1
  c.sharding.mesh_shape = (4, 1, 2)
  with pytest.raises(ValueError, match="model.num_kv_heads=1 is not divisible by the tensor"):
    config_lib.validate_config(c, num_devices=8)


def test_cli_rejects_unknown_key_before_compiling(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "cpt_jax.main", f"--config={REPO}/configs/tiny.py",
       f"--workdir={tmp_path}", "--config.train.stepz=3"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_every_config_file_validates():
  import importlib.util
  assert {"demo", "tiny", "llama3_2_1b", "qwen2_5_0_5b"} <= set(configs.names())
  for name in configs.names():
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python -m cpt_jax.main" in (module.__doc__ or ""), path
    presets = recipe.PRESETS if "recipe" in module.__doc__ else (None,)
    for arg in presets:
      config = module.get_config(arg) if arg else module.get_config()
      config_lib.validate_config(config)


def test_recipe_presets_and_packaged_config_names():
  c = llama3_2_1b.get_config("v5e-8")
  assert c.sharding.mesh_shape == (1, -1, 1) and c.model.dtype == "bfloat16"
  assert c.model.remat == "full" and c.optimizer.schedule == "rewarm_cosine"
  assert c.objective.replay_kd > 0 and c.data.replay and c.optimizer.lr == 3e-4
  assert llama3_2_1b.get_config("8xh100").model.attention == "cudnn"
  with pytest.raises(ValueError, match="config argument 'tpu'"):
    llama3_2_1b.get_config("tpu")
  packaged = str(REPO / "cpt_jax" / "configs" / "demo.py")
  assert configs.resolve("demo") == packaged == configs.resolve("/elsewhere/configs/demo.py")
  assert configs.resolve("llama3_2_1b:v5e-8").endswith("llama3_2_1b.py:v5e-8")
  assert configs.resolve("nothing.py") == "nothing.py"
  assert main_lib.resolve_argv(["p", "--config", "tiny", "--config.train.steps=3"])[2] == str(
      REPO / "cpt_jax" / "configs" / "tiny.py")


def test_demo_cpt_stages_see_the_same_t_rows():
  """cpt_plain: 16 py_help rows x 240 steps; cpt_replay_kd: 16 x 0.75 = 12 rows x 320."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from cpt_jax.schema import data as data_config  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  cfg = demo.get_config()
  t_rows = {}
  for name in ("cpt_plain", "cpt_replay_kd"):
    c = config_lib.stage_config(cfg, name)
    weights = dict(data_config.parse_weights(c.data.weights)) if c.data.weights else {}
    share = weights.get(c.data.new, 1.0) / (sum(weights.values()) or 1.0)
    rows_per_step = c.train.global_batch_size * share
    assert rows_per_step == int(rows_per_step), name  # the mixer's count is then exact
    t_rows[name] = c.train.steps * rows_per_step
  assert t_rows == {"cpt_plain": 3840, "cpt_replay_kd": 3840}


@pytest.mark.parametrize("train,match", [
    ({"on_divergence": "skip"}, r"train.on_divergence='skip'; expected one of \('stop', "
                                r"'rollback'\)"),
    ({"loss_spike_factor": 0.5}, r"train.loss_spike_factor=0.5 must be 0 \(off\) or > 1"),
    ({"max_rollbacks": -1}, r"train.max_rollbacks=-1 must be >= 0"),
    ({"on_divergence": "rollback", "keep_checkpoints": 1},
     r"train.keep_checkpoints=1: train.on_divergence='rollback' needs >= 2"),
    ({"on_divergence": "rollback", "loss_spike_factor": 3.0, "log_every": 10,
      "checkpoint_every": 5, "keep_checkpoints": 2},
     r"train.keep_checkpoints=2: .* needs >= 3 .*log window of 10 steps"),
])
def test_bad_divergence_keys_are_named(train, match):
  c = tiny_config()
  c.train.update(train)
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c, num_devices=8)


@pytest.mark.parametrize("update,match", [
    ({"objective.kd_topk": -1}, r"objective.kd_topk=-1 must be >= 0"),
    ({"optimizer.old_lr_scale": 0.5},
     r"optimizer.old_lr_scale=0.5 scales .*optimizer.old_moments='separate'.*'shared'"),
    ({"objective.replay_kd_ramp": 0.5}, r"objective.replay_kd_ramp=0.5 shapes .*replay_kd=0"),
    ({"objective.kd_tokens": "forgotten"},
     r"objective.kd_tokens='forgotten' picks .*lambda_kd = replay_kd = 0"),
    ({"data.distill": "beta"}, r"data.distill='beta': .*objective.lambda_kd=0"),
    ({"objective.kd_topk": 64}, r"objective.kd_topk=64 restricts .*lambda_kd = replay_kd = 0"),
    ({"optimizer.lookahead_alpha": 0.3},
     r"optimizer.lookahead_alpha=0.3 .*optimizer.lookahead_every=0"),
])
def test_settings_that_would_do_nothing_are_named(update, match):
  """Each of these was accepted and then had no effect on training."""
  c = tiny_config()
  for key, value in update.items():
    group, leaf = key.split(".")
    c[group][leaf] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c, num_devices=8)


def test_the_settings_above_pass_with_what_they_need():
  c = tiny_config()
  c.train.init_checkpoint = "/unused"
  c.optimizer.update(old_moments="separate", old_lr_scale=0.5)
  c.objective.update(replay_kd=1.0, replay_kd_ramp=0.5, kd_tokens="forgotten", kd_topk=8)
  config_lib.validate_config(c, num_devices=8)
  config_lib.validate_config(tiny_config(**{"optimizer.lookahead_every": 5,
                                            "optimizer.lookahead_alpha": 0.3}), num_devices=8)
  c = tiny_config()
  c.train.init_checkpoint = "/unused"
  c.data.distill = "beta"
  c.objective.ewc = 1.0  # EWC takes its Fisher from the distill rows
  config_lib.validate_config(c, num_devices=8)


def test_a_stage_s_divergence_keys_are_checked():
  c = tiny_config()
  c.stage_order = "a"
  c.stages.a = {"train": {"on_divergence": "rollback", "keep_checkpoints": 1}}
  with pytest.raises(ValueError, match=r"stages.a.train.keep_checkpoints=1"):
    config_lib.validate_config(c, num_devices=8)


def test_config_reference_is_current_and_complete():
  """docs/config.md is `python -m cpt_jax.config --reference`: regenerate it when this fails."""
  text = config_lib.reference_markdown()
  assert (REPO / "docs" / "config.md").read_text() == text, (
      "docs/config.md is stale: python -m cpt_jax.config --reference > docs/config.md")
  for key in ("data.add_bos", "train.init_from_hf", "optimizer.lr", "mixing.controller",
              "replay.strategy", "seed"):
    assert f"| `{key}` |" in text
  cli = subprocess.run([sys.executable, "-m", "cpt_jax.config", "--reference"],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
  assert cli.stdout == text


def test_config_reference_needs_a_comment_per_key(monkeypatch):
  source = config_lib._group_sources()  # pylint: disable=protected-access
  monkeypatch.setattr(config_lib, "_group_sources",
                      lambda: [source[0].replace("# Parameter init and the rows of the Fisher", "")]
                      + source[1:])
  with pytest.raises(ValueError, match="config key seed has no comment"):
    config_lib.reference_markdown()
