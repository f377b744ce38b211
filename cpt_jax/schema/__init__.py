"""Config groups: defaults and validation of `data`, `mixing`, `replay`, `decomposition`.

The bottom layer of the package: these modules import only `batch`. The full
schema (every group, stages) is assembled in `cpt_jax/config.py`.
"""
