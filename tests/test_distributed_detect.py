"""Which launches start jax.distributed, with which arguments, and which are errors.

`distributed.launch_args(config.distributed, environ)` is a pure function: every
convention the README and launch/ scripts document, JAX's own launchers, and the
half-configured launches that must fail rather than start N runs in one workdir.
"""

import pytest

from cpt_jax import config as config_lib
from cpt_jax.parallel import distributed
from tests import helpers

SLURM = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def _dist(**kw):
  d = config_lib.default_config().distributed
  d.update(kw)
  return d


def _args(environ=None, **kw):
  return distributed.launch_args(_dist(**kw), environ or {})


def test_a_plain_single_process_run_does_not_initialize():
  assert _args() is None
  assert _args({"HOME": "/root", "SLURM_JOB_ID": "5"}) is None  # an allocation, no task count
  assert _args({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_config_keys_are_passed_on():
  assert _args(coordinator_address="h:1234", num_processes=2, process_id=1) == \
      {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}


@pytest.mark.parametrize("prefix,coord", [("", "COORDINATOR"), ("CPT_", "CPT_COORDINATOR_ADDRESS"),
                                          ("JAX_", "JAX_COORDINATOR_ADDRESS")])
def test_each_environment_convention_is_passed_on(prefix, coord):
  env = {coord: "h0:999", f"{prefix}NUM_PROCESSES": "4", f"{prefix}PROCESS_ID": "3"}
  assert _args(env) == {"coordinator_address": "h0:999", "num_processes": 4, "process_id": 3}


def test_config_wins_over_environment_field_by_field():
  env = {"COORDINATOR": "env:1", "NUM_PROCESSES": "4", "PROCESS_ID": "2",
         "CPT_PROCESS_ID": "3"}
  assert _args(env, coordinator_address="cfg:2") == \
      {"coordinator_address": "cfg:2", "num_processes": 4, "process_id": 3}


def test_launchers_jax_detects_get_no_arguments():
  assert _args(SLURM) == {}
  ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "2",
          "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
  assert _args(ompi) == {}
  assert _args({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
  assert _args({"TPU_WORKER_HOSTNAMES": "w0"}) is None  # a single-host slice


def test_a_launcher_fills_what_the_variables_leave_out():
  assert _args({**SLURM, "COORDINATOR": "n1:5000"}) == {"coordinator_address": "n1:5000"}


def test_yes_and_cpt_distributed_force_it_and_let_jax_detect_the_rest():
  assert _args(initialize="yes") == {}  # a TPU VM slice: JAX asks the metadata server
  assert _args({"CPT_DISTRIBUTED": "1"}) == {}
  assert _args({"CPT_DISTRIBUTED": "1", "CPT_NUM_PROCESSES": "8"}) == {"num_processes": 8}


def test_no_and_cpt_distributed_0_keep_one_process():
  env = {"COORDINATOR": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}
  assert _args(env, initialize="no") is None
  assert _args({**env, "CPT_DISTRIBUTED": "0"}) is None
  assert _args({**env, "NUM_PROCESSES": "1"}) is None  # one process is a single run


@pytest.mark.parametrize("env,kw,missing", [
    ({"COORDINATOR": "h:1"}, {}, "no num_processes and no process_id"),
    ({"NUM_PROCESSES": "2"}, {}, "no coordinator_address and no process_id"),
    ({"COORDINATOR": "h:1", "NUM_PROCESSES": "2"}, {}, "no process_id"),
    ({"CPT_NUM_PROCESSES": "2", "CPT_PROCESS_ID": "0"}, {}, "no coordinator_address"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2}, "no process_id"),
])
def test_a_half_configured_launch_is_an_error(env, kw, missing):
  with pytest.raises(ValueError, match="half-configured") as e:
    _args(env, **kw)
  assert missing in str(e.value)


@pytest.mark.parametrize("env,kw,match", [
    ({"NUM_PROCESSES": "two"}, {}, "NUM_PROCESSES='two' is not an integer"),
    ({}, {"initialize": "maybe"}, "distributed.initialize='maybe'"),
    ({"COORDINATOR": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, {},
     "PROCESS_ID=2 is not below NUM_PROCESSES=2"),
    ({}, {"process_id": -3, "num_processes": 2, "coordinator_address": "h:1"},
     "process id must be >= 0"),
])
def test_bad_values_name_their_source(env, kw, match):
  with pytest.raises(ValueError, match=match):
    _args(env, **kw)


def test_the_command_line_refuses_a_half_configured_launch(tmp_path):
  """NUM_PROCESSES=2 alone: one `error:` line and status 2 before anything runs, not two
  independent runs in one workdir."""
  config = helpers.write_cli_config(tmp_path, tmp_path / "no-corpus-needed")
  status, _, err = helpers.run_cli(config, tmp_path / "run", env={"NUM_PROCESSES": "2"})
  assert status == 2, err[-2000:]
  assert err.startswith("error: a half-configured multi-process launch: NUM_PROCESSES=2")
  assert not (tmp_path / "run").exists()
