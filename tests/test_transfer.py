"""Transfer metrics on hand-made loss matrices."""

import numpy as np
import pytest

from cpt_jax.eval.transfer import transfer_metrics

DOMAINS = ["a", "b", "c"]
# Rows: base M (learned a), after stage 1 (learned b), after stage 2 (learned c).
L = np.array([[1.0, 3.0, 4.0],
              [1.5, 1.0, 3.5],
              [2.0, 1.2, 1.0]])
LEARNED = [["a"], ["b"], ["c"]]
# Loss of a randomly initialised model on each domain.
BASELINE = {"a": 5.0, "b": 4.5, "c": 6.0}


def test_hand_made_matrix():
  m = transfer_metrics(L, DOMAINS, LEARNED, baseline=BASELINE)
  # bwt: (L0a - L2a) + (L1b - L2b) = (1-2) + (1-1.2) -> mean -0.6
  assert m["bwt"] == pytest.approx(-0.6)
  # fwt: stage 1 trains b: b_b - L0b = 4.5 - 3.0 = 1.5;
  #      stage 2 trains c: b_c - L1c = 6.0 - 3.5 = 2.5 -> mean 2.0
  assert m["fwt"] == pytest.approx(2.0)
  assert m["forgetting"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.2)}
  assert m["mean_forgetting"] == pytest.approx(0.6)
  assert m["average_loss"] == pytest.approx((2.0 + 1.2 + 1.0) / 3)


def test_fwt_counts_each_domain_once_at_the_stage_that_trains_it_as_new():
  """Pretrain learns a, b; stage 1 trains c (replays a); stage 2 trains e and a again."""
  domains = ["a", "b", "c", "e"]
  loss = np.array([[1.0, 1.2, 3.0, 5.0],
                   [1.4, 1.6, 1.1, 4.0],
                   [1.3, 1.5, 2.0, 1.0]])
  learned = [["a", "b"], ["c", "a"], ["e", "a", "b"]]
  new = [["a", "b"], ["c"], ["e", "a"]]
  baseline = {"a": 5.5, "b": 5.5, "c": 5.0, "e": 5.5}
  m = transfer_metrics(loss, domains, learned, new=new, baseline=baseline)
  # c: b_c - L0c = 5.0 - 3.0 = 2.0; e: b_e - L1e = 5.5 - 4.0 = 1.5. a and b are the
  # pretrain's (no stage before it); a trained as new again in stage 2 is not transfer.
  assert m["fwt"] == pytest.approx(1.75)
  # A stage before that made c worse than the random init: negative transfer.
  m = transfer_metrics(loss, domains, learned, new=new, baseline={**baseline, "c": 2.0,
                                                                  "e": 3.0})
  assert m["fwt"] == pytest.approx(((2.0 - 3.0) + (3.0 - 4.0)) / 2)


def test_fwt_needs_the_baseline():
  assert transfer_metrics(L, DOMAINS, LEARNED)["fwt"] is None
  with pytest.raises(ValueError, match="baseline"):
    transfer_metrics(L, DOMAINS, LEARNED, baseline={"b": 1.0})


def test_no_forgetting_gives_zero():
  flat = np.array([[1.0, 2.0], [1.0, 1.0]])
  m = transfer_metrics(flat, ["a", "b"], [["a"], ["b"]])
  assert m["bwt"] == 0.0 and m["forgetting"] == {"a": 0.0}


def test_unknown_domain_is_an_error():
  with pytest.raises(ValueError, match="no column"):
    transfer_metrics(L, DOMAINS, [["a"], ["zz"], ["c"]])


def test_tables_print_as_many_decimals_as_tell_rows_apart():
  """1.95791 and 1.95795 read 1.958 at three decimals; the column gets four."""
  from cpt_jax.eval import report as report_lib  # pylint: disable=g-import-not-at-top
  table = report_lib._table(["stage", "loss"], [["a", 1.95791], ["b", 1.95795], ["c", None]])  # pylint: disable=protected-access
  assert "| a | 1.9579 |" in table and "| b | 1.9580 |" in table and "| c | - |" in table
  assert "| x | 2.000 |" in report_lib._table(["s", "v"], [["x", 2.0], ["y", 2.5]])  # pylint: disable=protected-access
