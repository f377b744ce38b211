r"""Continued pre-training of Llama 3.2 1B (the recipe: `cpt_jax/configs/recipe.py`).

Presets by argument: `:v5e-8` (a TPU v5e-8 host), `:8xh100` (default), `:cpu-smoke`
(the recipe in seconds on CPU, run by tests/test_recipes.py on a tiny random
checkpoint). Re-warm to 3e-4 over 1% of the steps, cosine re-decay to 10%
(Ibrahim et al. 2024, arXiv:2403.08763; Gupta et al. 2023, arXiv:2308.04014), 5%
replay distilled from the starting model, bf16, remat, FSDP; the sources of the
values are in recipe.py. Documents start with <|begin_of_text|> (data.add_bos='auto').

  python -m cpt_jax.main --config=configs/llama3_2_1b.py:8xh100 --workdir=/tmp/cpt_llama \
    --config.train.init_from_hf=/models/Llama-3.2-1B --config.data.corpus_dir=/data/corpus \
    --config.data.new=my_domain --config.data.replay=web --config.data.weights='my_domain=0.95,*=0.05'
  python -m cpt_jax.export --checkpoint /tmp/cpt_llama --out /tmp/cpt_llama_hf \
    --like /models/Llama-3.2-1B
"""

from cpt_jax.configs import recipe


def get_config(arg=None):
  return recipe.cpt_recipe(arg, "/models/Llama-3.2-1B")
