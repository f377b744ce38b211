"""Transfer metrics on a hand-made loss matrix."""

import numpy as np
import pytest

from cpt_jax.eval.transfer import transfer_metrics

DOMAINS = ["a", "b", "c"]
# Rows: base M (learned a), after stage 1 (learned b), after stage 2 (learned c).
L = np.array([[1.0, 3.0, 4.0],
              [1.5, 1.0, 3.5],
              [2.0, 1.2, 1.0]])
LEARNED = [["a"], ["b"], ["c"]]


def test_hand_made_matrix():
  m = transfer_metrics(L, DOMAINS, LEARNED)
  # bwt: (L0a - L2a) + (L1b - L2b) = (1-2) + (1-1.2) -> mean -0.6
  assert m["bwt"] == pytest.approx(-0.6)
  # fwt: stage1 b: L0b - L0b = 0; stage2 c: L0c - L1c = 0.5 -> mean 0.25
  assert m["fwt"] == pytest.approx(0.25)
  assert m["forgetting"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.2)}
  assert m["mean_forgetting"] == pytest.approx(0.6)
  assert m["average_loss"] == pytest.approx((2.0 + 1.2 + 1.0) / 3)


def test_no_forgetting_gives_zero():
  flat = np.array([[1.0, 2.0], [1.0, 1.0]])
  m = transfer_metrics(flat, ["a", "b"], [["a"], ["b"]])
  assert m["bwt"] == 0.0 and m["forgetting"] == {"a": 0.0}


def test_unknown_domain_is_an_error():
  with pytest.raises(ValueError, match="no column"):
    transfer_metrics(L, DOMAINS, [["a"], ["zz"], ["c"]])
