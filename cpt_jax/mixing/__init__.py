"""Online data mixing: controllers that move the mixture weights during a stage.

`config.mixing` (default_mixing_config) picks the controller; `Controller`
(wrapper.py) wraps the pure `init_state` / `update` functions (controllers.py)
for the loop (mixing/hook.py) and the checkpoint; constraints.py holds the
floor and the max old share every adaptive controller's weights obey.
Importing this package needs only numpy.
"""

from cpt_jax.schema.mixing import CONTROLLERS
from cpt_jax.schema.mixing import default_mixing_config
from cpt_jax.schema.mixing import parse_schedule
from cpt_jax.schema.mixing import validate_mixing_config
from cpt_jax.mixing.controllers import accumulate
from cpt_jax.mixing.controllers import exp3_exploration
from cpt_jax.mixing.controllers import init_state
from cpt_jax.mixing.controllers import schedule_weights
from cpt_jax.mixing.controllers import update
from cpt_jax.mixing.controllers import window_loss
from cpt_jax.mixing.wrapper import Controller
from cpt_jax.mixing.wrapper import controller_overhead_seconds
