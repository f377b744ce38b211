"""The real-model recipe end to end on CPU: a tiny random HF-format Llama checkpoint
(written here with the project's own export), imported, continued with replay + KD,
exported again, through the commands of the recipe's docstring (`:cpu-smoke`); the exported
folder read by `transformers` gives this project's logits."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import export as export_lib
from cpt_jax.model import hf
from cpt_jax.model.transformer import ModelConfig, Transformer
from tests import helpers
from tests.conftest import REPO

pytest.importorskip("safetensors", reason="safetensors not installed: pip install -e '.[hf]'")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed (.[hf] extra)")

WORDS = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "[UNK]", "the", "quick", "brown",
         "fox", "jumps", "over", "lazy", "dog", "def", "return", "x", "+", "1", "(", ")", ":"]
MODEL = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)


def write_llama_folder(folder):
  """A Llama-format folder: random weights (save_hf) + a tokenizer.json adding BOS."""
  params = Transformer(MODEL).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  hf.save_hf(jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value")),
             MODEL, str(folder), architecture="LlamaForCausalLM")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(WORDS[:3])
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))


def write_corpus(root):
  rng = np.random.default_rng(0)
  text = {"new": WORDS[4:12], "old": WORDS[12:]}
  for domain, words in text.items():
    for split, n in (("train", 60), ("validation", 12)):
      path = root / domain / f"{split}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("".join(
          json.dumps({"id": str(i), "text": " ".join(rng.choice(words, 12).tolist())}) + "\n"
          for i in range(n)))
  return root


@pytest.fixture(name="recipe", scope="module")
def _recipe(tmp_path_factory):
  """The `:cpu-smoke` recipe's commands: (start folder, workdir, exported folder)."""
  tmp_path = tmp_path_factory.mktemp("recipe")
  model = tmp_path / "Llama-tiny"
  model.mkdir()
  write_llama_folder(model)
  corpus = write_corpus(tmp_path / "corpus")
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "cpt_jax.main", "--config=configs/llama3_2_1b.py:cpu-smoke",
       f"--workdir={workdir}", f"--config.train.init_from_hf={model}",
       f"--config.data.corpus_dir={corpus}"],
      capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "exported"
  export_lib.main(["--checkpoint", str(workdir), "--out", str(out), "--like", str(model)])
  return model, workdir, out


def test_llama_recipe_cpu_smoke_imports_trains_with_replay_and_kd_and_exports(recipe):
  model, workdir, out = recipe
  run_cfg = json.loads((workdir / "config.json").read_text())
  assert run_cfg["train"]["init_from_hf"] == str(model)
  assert run_cfg["data"]["vocab"] == str(model / "tokenizer.json")
  assert run_cfg["model"]["dtype"] == "bfloat16" and run_cfg["model"]["remat"] == "full"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records and records[-1]["step"] == 6
  assert all(np.isfinite(r["loss"]) for r in records)
  assert all(r["teacher_rows"] > 0 and "replay" in r["role_loss"] for r in records), \
      "replay rows in every window, distilled by the teacher (replay_kd)"
  exported = json.loads((out / "config.json").read_text())
  assert exported["architectures"] == ["LlamaForCausalLM"]
  assert (out / "tokenizer.json").is_file()
  start = hf.load_hf_params(str(model), MODEL)
  trained = hf.load_hf_params(str(out), MODEL)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), start, trained)
  assert max(jax.tree.leaves(moved)) > 0, "continued pre-training changed the weights"


def test_the_exported_folder_loads_in_transformers_with_the_projects_logits(recipe, tmp_path):
  """`transformers` (in tests/hf_parity_worker.py's process) reads the recipe's export and
  gives the logits this project computes from the same folder, in float32."""
  helpers.require_parity()
  _, _, out = recipe
  cfg = ModelConfig(**hf.hf_model_config(str(out)))  # float32 compute (the default)
  assert cfg.vocab_size == MODEL.vocab_size and cfg.num_layers == MODEL.num_layers
  tokens_BxL = np.random.default_rng(1).integers(0, len(WORDS), (2, 24))
  tokens_BxL[:, 0] = WORDS.index("<|begin_of_text|>")  # rows start as the recipe's do
  params = hf.load_hf_params(str(out), cfg)
  ours_BxLxV = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens_BxL))
  np.save(tmp_path / "tokens.npy", tokens_BxL)
  answer = helpers.parity_worker("load", out, tmp_path / "tokens.npy", tmp_path / "theirs.npy")
  assert answer["class"] == "LlamaForCausalLM"
  theirs_BxLxV = np.load(tmp_path / "theirs.npy")
  assert theirs_BxLxV.shape == ours_BxLxV.shape == (2, 24, MODEL.vocab_size)
  print(f"max |logit diff| = {np.abs(ours_BxLxV - theirs_BxLxV).max():.2e}")
  np.testing.assert_allclose(ours_BxLxV, theirs_BxLxV, atol=1e-4, rtol=0)
