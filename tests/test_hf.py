"""Hugging Face import/export: exact round trips, sharded loading, bad input, parity.

Import and export need the `hf` extra (safetensors with numpy, tokenizers), never torch.
The parity tests compare with tiny random `transformers` models (PyTorch, CPU) built and
run by tests/hf_parity_worker.py in a subprocess, so that torch never loads beside the
TensorFlow and JAX of this process (issue 21). They need the test-only `parity` extra
(`pip install -e '.[dev,hf,parity]'`) and skip without it.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

safetensors = pytest.importorskip(
    "safetensors", reason="safetensors not installed: pip install -e '.[hf]'")

from cpt_jax import export as export_lib
from cpt_jax.model import hf
from cpt_jax.model import hf_weights
from cpt_jax.model.transformer import ModelConfig, Transformer
from cpt_jax.parallel import sharding as shd
from tests import helpers

CFG = ModelConfig(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=128, norm_eps=1e-6)
HF_KW = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _random_params(cfg, seed=0):
  params = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  # Non-trivial norms and biases so every tensor's mapping is exercised.
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.1
      if p[-1].key in ("scale", "bias") else x, nn.unbox(params))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _tensors(folder):
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(folder, f), framework="numpy") as h:
        out.update({k: h.get_tensor(k) for k in h.keys()})
  return out


# ---------------------------------------------------------------- round trips (no torch)


@pytest.mark.parametrize("overrides", [
    dict(qkv_bias=True),
    dict(scan_layers=True, tie_embeddings=True),
    dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=64),
])
def test_round_trip_import_export_import_is_exact(tmp_path, overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  params = _random_params(cfg)
  hf.save_hf(params, cfg, tmp_path / "a", max_shard_bytes=60_000)  # several shards
  assert (tmp_path / "a" / hf_weights.INDEX_FILE).is_file()
  fields = hf.hf_model_config(str(tmp_path / "a"))
  assert ModelConfig(**fields, scan_layers=cfg.scan_layers) == cfg
  first = hf.load_hf_params(str(tmp_path / "a"), cfg)
  hf.save_hf(first, cfg, tmp_path / "b")  # one file
  second = hf.load_hf_params(str(tmp_path / "b"), cfg)
  _assert_trees_equal(first, second)
  a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Exported values equal ours; the vocab padding is dropped and re-imported as zeros.
  emb = np.asarray(params["embed"]["embedding"])
  np.testing.assert_array_equal(a["model.embed_tokens.weight"], emb[:cfg.vocab_size])
  np.testing.assert_array_equal(np.asarray(first["embed"]["embedding"])[cfg.vocab_size:], 0)
  assert ("lm_head.weight" in a) == (not cfg.tie_embeddings)


def test_bfloat16_export_round_trip(tmp_path):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                        _random_params(CFG))
  hf.save_hf(params, CFG, tmp_path / "bf", dtype="bfloat16")
  assert _tensors(tmp_path / "bf")["model.norm.weight"].dtype == jnp.bfloat16
  loaded = hf.load_hf_params(str(tmp_path / "bf"), CFG)
  np.testing.assert_array_equal(loaded["layers_1"]["attn"]["o"]["kernel"],
                                params["layers_1"]["attn"]["o"]["kernel"])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_load_places_each_shard(tmp_path, scan_layers):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers, qkv_bias=True)
  hf.save_hf(_random_params(cfg), cfg, tmp_path, max_shard_bytes=100_000)
  mesh = shd.make_mesh((1, 4, 2))
  boxed = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  shardings = shd.logical_shardings(boxed, mesh, shd.DEFAULT_RULES)
  sharded = hf.load_hf_params(str(tmp_path), cfg, shardings)
  plain = hf.load_hf_params(str(tmp_path), cfg)
  _assert_trees_equal(sharded, plain)
  for x, sh in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert x.sharding == sh
  q = sharded["layers"]["attn"]["q"]["kernel"] if scan_layers else \
      sharded["layers_0"]["attn"]["q"]["kernel"]
  # [.., D, H, E] split 4-way over D (fsdp) and 2-way over H (tensor).
  assert q.addressable_shards[0].data.shape == q.shape[:-3] + (16, 2, 16)


# ---------------------------------------------------------------- bad input


@pytest.fixture(name="saved")
def _saved(tmp_path):
  hf.save_hf(_random_params(CFG), CFG, tmp_path, max_shard_bytes=100_000)
  return tmp_path


def test_missing_shard_names_the_file(saved):
  victim = sorted(p for p in os.listdir(saved) if p.endswith(".safetensors"))[1]
  os.remove(saved / victim)
  with pytest.raises(FileNotFoundError, match=victim):
    hf.load_hf_params(str(saved), CFG)


def test_shape_mismatch_names_the_tensor(saved):
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 128\)"):
    hf.load_hf_params(str(saved), dataclasses.replace(CFG, mlp_dim=96))


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
  with pytest.raises(ValueError, match=r"model\.layers\.1\.input_layernorm\.weight"):
    hf.load_hf_params(str(saved), dataclasses.replace(CFG, num_layers=1))
  with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.[qkv]_proj\.bias"):
    hf.load_hf_params(str(saved), dataclasses.replace(CFG, qkv_bias=True))
  tied = dataclasses.replace(CFG, tie_embeddings=True)
  hf.load_hf_params(str(saved), tied)  # an untied file's lm_head is dropped
  hf.save_hf(_random_params(tied), tied, tmp_path / "tied")
  with pytest.raises(KeyError, match=r"lm_head\.weight"):
    hf.load_hf_params(str(tmp_path / "tied"), CFG)


def _write_config(folder, **fields):
  folder.mkdir(exist_ok=True)
  base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300,
              hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
  base.update(fields)
  (folder / "config.json").write_text(json.dumps(base))
  return str(folder)


@pytest.mark.parametrize("fields,match", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "architectures="),
    (dict(architectures=[], model_type="gemma"), "model_type='gemma'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16),
     "sliding_window=16"),
])
def test_unsupported_config_names_the_field(tmp_path, fields, match):
  with pytest.raises(ValueError, match=match):
    hf.hf_model_config(_write_config(tmp_path / "m", **fields), seq_len=32)


def test_config_fields_both_transformers_layouts(tmp_path):
  v4 = hf.hf_model_config(_write_config(tmp_path / "v4", rope_theta=5e5, rope_scaling=LLAMA3_ROPE,
                                        tie_word_embeddings=True, rms_norm_eps=1e-5))
  v5 = hf.hf_model_config(_write_config(
      tmp_path / "v5", rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5},
      tie_word_embeddings=True, rms_norm_eps=1e-5))
  assert v4 == v5
  assert v4["rope_scaling"] == "llama3" and v4["rope_original_max_len"] == 16
  assert v4["rope_theta"] == 5e5 and v4["tie_embeddings"] and v4["head_dim"] == 16
  window = dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
  assert hf.hf_model_config(_write_config(tmp_path / "w", **window), seq_len=64)["num_layers"] == 2
  qwen = hf.hf_model_config(_write_config(tmp_path / "q", model_type="qwen2",
                                          architectures=["Qwen2ForCausalLM"], sliding_window=8,
                                          use_sliding_window=False), seq_len=64)
  assert qwen["qkv_bias"]


def test_pickled_weights_only_are_refused_without_unpickling(tmp_path):
  folder = _write_config(tmp_path / "m")
  # Not a pickle at all: any attempt to unpickle it would fail differently.
  (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors.*save_pretrained"):
    hf.load_hf_params(folder, CFG)


# ---------------------------------------------------------------- tokenizer and CLI


def test_hf_vocab_prefers_sentencepiece_then_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed (.[hf] extra)")
  words = ["<pad>", "</s>", "the", "quick", "fox", "[UNK]"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  spec = hf.hf_vocab(str(tmp_path))
  assert spec.endswith("tokenizer.json")
  vocab = hf.TokenizerJsonVocab(spec)
  assert (vocab.vocab_size, vocab.eos_id, vocab.pad_id) == (6, 1, 0)
  flat_T, lengths_O = vocab.encode_batch(["the quick fox", "fox dog"])
  np.testing.assert_array_equal(flat_T, [2, 3, 4, 4, 5])
  np.testing.assert_array_equal(lengths_O, [3, 2])
  assert vocab.key.startswith("hftok:")
  (tmp_path / "tokenizer.model").write_bytes(b"")
  assert hf.hf_vocab(str(tmp_path)).endswith("tokenizer.model")


def test_cli_exports_an_orbax_checkpoint(tmp_path):
  from cpt_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cpt_jax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(CFG, qkv_bias=True)
  params = _random_params(cfg)
  workdir = tmp_path / "run"
  ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  ckpt.save(3, TrainState(step=jnp.int32(3), params=params, opt_state={}), {"note": "x"})
  ckpt.close()
  (workdir / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
  export_lib.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "out")])
  loaded = hf.load_hf_params(str(tmp_path / "out"), cfg)
  _assert_trees_equal(loaded["layers_1"], params["layers_1"])
  assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
      "Qwen2ForCausalLM"]
  # A missing or empty folder names the flag it came from, not a training config key.
  with pytest.raises(FileNotFoundError, match=r"^--checkpoint: no checkpoint folder"):
    export_lib.restore_for_export(str(tmp_path / "missing"), cfg)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"^--checkpoint: .* holds no finished checkpoint"):
    export_lib.restore_for_export(str(tmp_path / "empty"), cfg)


# ---------------------------------------------------------------- parity with transformers


FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, rope_theta=5e5)),
    "mistral": ("MistralConfig", dict(sliding_window=64)),
    "qwen2": ("Qwen2Config", {}),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
}
TOKENS_BxL = np.random.default_rng(0).integers(0, HF_KW["vocab_size"], (2, 48))


@pytest.fixture(name="references", scope="module")
def _references(tmp_path_factory):
  """Every family built by transformers in one worker run: {family: (folder, logits, class)}."""
  helpers.require_parity()
  root = tmp_path_factory.mktemp("hf_ref")
  np.save(root / "tokens.npy", TOKENS_BxL)
  models = {name: {"config_class": cls, "kwargs": {**HF_KW, **extra}, "dir": str(root / name),
                   "logits": str(root / f"{name}.npy")}
            for name, (cls, extra) in FAMILIES.items()}
  (root / "spec.json").write_text(json.dumps({"tokens": str(root / "tokens.npy"),
                                              "models": models}))
  classes = helpers.parity_worker("build", root / "spec.json")
  return {name: (root / name, np.load(m["logits"]), classes[name]) for name, m in models.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, references, family):
  folder, want, hf_class = references[family]
  cfg = ModelConfig(**hf.hf_model_config(str(folder), seq_len=48))
  params = hf.load_hf_params(str(folder), cfg)
  logits = lambda c, p: np.asarray(jax.jit(Transformer(c).apply)({"params": p}, TOKENS_BxL))
  got = logits(cfg, params)
  print(f"{family}: max |logit diff| = {np.abs(got - want).max():.2e}")
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if cfg.rope_scaling:  # the scaling matters at this length
    assert np.abs(logits(dataclasses.replace(cfg, rope_scaling=""), params) - want).max() > 1e-3

  hf.save_hf(params, cfg, tmp_path / "out", like=str(folder),
             max_shard_bytes=100_000)  # sharded, with an index
  np.save(tmp_path / "tokens.npy", TOKENS_BxL)
  back = helpers.parity_worker("load", tmp_path / "out", tmp_path / "tokens.npy", tmp_path / "again.npy")
  assert back["class"] == hf_class
  np.testing.assert_allclose(np.load(tmp_path / "again.npy"), want, atol=1e-5, rtol=0)


def test_parity_worker_refuses_to_run_beside_tensorflow_or_jax(tmp_path):
  """The worker fails, rather than risk the crash, when JAX or TensorFlow is loaded with it."""
  helpers.require_parity()
  code = (f"import runpy, sys, jax; sys.argv = ['w', 'load', {str(tmp_path)!r}, 'x', 'y']; "
          f"runpy.run_path({str(helpers.PARITY_WORKER)!r}, run_name='__main__')")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, check=False)
  assert res.returncode != 0 and "['jax']" in res.stderr, res.stderr[-3000:]
