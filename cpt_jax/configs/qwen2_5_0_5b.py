r"""Continued pre-training of Qwen2.5-0.5B (the recipe: `cpt_jax/configs/recipe.py`).

Presets by argument: `:v5e-8`, `:8xh100` (default), `:cpu-smoke`. The same recipe as
llama3_2_1b.py (re-warm to 3e-4 over 1% of the steps, cosine re-decay to 10%, 5%
replay distilled from the starting model, bf16, remat, FSDP; sources in recipe.py);
Qwen2.5 has no BOS, so documents start with token 0 as before (data.add_bos='auto'),
and its tied embeddings and q/k/v biases come from its config.json.

  python -m cpt_jax.main --config=configs/qwen2_5_0_5b.py:v5e-8 --workdir=/tmp/cpt_qwen \
    --config.train.init_from_hf=/models/Qwen2.5-0.5B --config.data.corpus_dir=/data/corpus \
    --config.data.new=my_domain --config.data.replay=web --config.data.weights='my_domain=0.95,*=0.05'
  python -m cpt_jax.export --checkpoint /tmp/cpt_qwen --out /tmp/cpt_qwen_hf \
    --like /models/Qwen2.5-0.5B
"""

from cpt_jax.configs import recipe


def get_config(arg=None):
  return recipe.cpt_recipe(arg, "/models/Qwen2.5-0.5B")
