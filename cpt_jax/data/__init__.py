"""Data pipeline of cpt_jax: sources -> packed-row stores -> mixer -> batches.

Importing this package is cheap (no TensorFlow / seqio); those load lazily in
the TFRecord/TFDS readers, `tasks` and `convert`.
"""

from cpt_jax.schema.data import add_data_config
from cpt_jax.schema.data import default_data_config
from cpt_jax.schema.data import validate_data_config
from cpt_jax.data.pipeline import make_pipeline
from cpt_jax.data.pipeline import Pipeline
from cpt_jax.data.sources import DataError

__all__ = ["add_data_config", "default_data_config", "validate_data_config", "make_pipeline",
           "Pipeline", "DataError"]
