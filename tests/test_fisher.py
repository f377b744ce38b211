"""EWC's diagonal Fisher: the true Fisher (labels sampled from the model) or the empirical one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax import data as data_lib
from cpt_jax.train import context as context_lib
from cpt_jax.train import regularizers
from cpt_jax.train import state as state_lib
from cpt_jax.model.transformer import flops_per_token
from tests.helpers import crash_then_resume, one_device_config, tiny_config, train_one_device
from tests.helpers import write_corpus

ROWS, SEED = 5, 3


def _reference(model, params, batch, labels_fn):
  """mean over rows of (d/d theta of the row's mean token NLL)^2, one row at a time."""
  total = jax.tree.map(np.zeros_like, jax.device_get(params))
  for i in range(batch["inputs"].shape[0]):
    inputs, seg, pos = (batch[k][i:i + 1] for k in ("inputs", "segment_ids", "positions"))
    w = batch["loss_weights"][i].astype(np.float32)
    logits = model.apply({"params": params}, inputs, seg, pos)[0]
    labels = labels_fn(i, logits, batch["targets"][i])

    def nll(p):
      lg = model.apply({"params": p}, inputs, seg, pos)[0].astype(jnp.float32)
      logp = lg - jax.scipy.special.logsumexp(lg, axis=-1, keepdims=True)
      tok = -logp[np.arange(lg.shape[0]), labels]
      return jnp.sum(tok * w) / max(float(w.sum()), 1.0)

    g = jax.device_get(jax.grad(nll)(params))
    total = jax.tree.map(lambda a, x: a + np.square(np.asarray(x, np.float64)), total, g)
  return jax.tree.map(lambda a: a / batch["inputs"].shape[0], total)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fisher")
  c = tiny_config()
  c.data.update(corpus_dir=str(write_corpus(tmp / "corpus")), cache_dir=str(tmp / "cache"))
  c.sharding.mesh_shape = (1, 1, 1)
  c.objective.ewc = 1.0
  c.train.init_checkpoint = "unused"  # only satisfies validation: the test builds M
  ctx = context_lib.build_context(c, jax.devices()[:1])
  params = state_lib.init_state(ctx.model, ctx.layout, ctx.state_sh, 0, c.data.seq_len).params
  pipe = data_lib.make_pipeline(c.data, global_batch_size=8)
  yield c, ctx, params, pipe
  pipe.close()


def _compare(got, want):
  flat_got, flat_want = jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want)
  for g, w in zip(flat_got, flat_want):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-12 + 2e-3 * float(np.abs(w).max()))


def test_empirical_fisher_squares_gradients_of_the_data_labels(setup):
  c, ctx, params, pipe = setup
  got = regularizers.estimate_fisher(ctx, params, pipe, ["beta", "gamma"], ROWS, SEED,
                                     mode="empirical")
  batch = pipe.training_rows(["beta", "gamma"], ROWS, SEED)
  want = _reference(ctx.model, params, batch, lambda i, logits, targets: np.asarray(targets))
  _compare(got, want)


def test_true_fisher_samples_labels_from_the_model(setup):
  c, ctx, params, pipe = setup
  got = regularizers.estimate_fisher(ctx, params, pipe, ["beta", "gamma"], ROWS, SEED,
                                     mode="true")
  batch = pipe.training_rows(["beta", "gamma"], ROWS, SEED)
  keys = jax.random.split(jax.random.key(SEED), ROWS)  # row i draws with keys[i]
  sampled = []

  def labels(i, logits, targets):
    y = np.asarray(jax.random.categorical(keys[i], logits.astype(jnp.float32), axis=-1))
    sampled.append(y)
    return y

  want = _reference(ctx.model, params, batch, labels)
  _compare(got, want)
  # A random model's samples are not the data: the two Fishers differ.
  emp = regularizers.estimate_fisher(ctx, params, pipe, ["beta", "gamma"], ROWS, SEED,
                                     mode="empirical")
  assert np.mean(np.concatenate(sampled) == batch["targets"][:ROWS].ravel()) < 0.5
  assert not np.allclose(jax.device_get(emp["lm_head"]["kernel"]),
                         jax.device_get(got["lm_head"]["kernel"]), rtol=0.1)
  # The default is the true Fisher; the config key is validated.
  assert config_lib.default_config().objective.ewc_fisher == "true"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(
      regularizers.estimate_fisher(ctx, params, pipe, ["beta", "gamma"], ROWS, SEED)))
  bad = tiny_config()
  bad.objective.ewc_fisher = "fisher"
  with pytest.raises(ValueError, match="objective.ewc_fisher"):
    config_lib.validate_config(bad)


def test_a_stage_reports_its_fisher_pass_also_after_a_resume(tmp_path):
  """summary['fisher_tflops']: ewc_batches x global_batch_size rows, forward and backward,
  counted once for the stage, in a resumed invocation too (it restores the Fisher)."""
  corpus = write_corpus(tmp_path / "corpus")
  plain = train_one_device(one_device_config(corpus, **{"train.steps": 2}), tmp_path / "m")
  assert plain["fisher_tflops"] == 0.0
  c = one_device_config(corpus, **{"train.steps": 6, "train.checkpoint_every": 2,
                                   "train.log_every": 2, "objective.ewc": 1.0,
                                   "objective.ewc_batches": 2,
                                   "train.init_checkpoint": str(tmp_path / "m")})
  out = crash_then_resume(c, tmp_path / "cpt", step=4)
  assert out["init"].startswith("resumed")
  L = c.data.seq_len
  model_cfg = context_lib.build_context(c, jax.devices()[:1]).model_cfg
  want = 2 * c.train.global_batch_size * L * flops_per_token(model_cfg, L, training=True) / 1e12
  assert out["fisher_tflops"] == pytest.approx(want, rel=1e-12) and want > 0
