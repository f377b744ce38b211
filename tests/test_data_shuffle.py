"""The Feistel index shuffle: a bijection of [0, n), keyed, uniform-looking, O(1) memory."""

import numpy as np
import pytest

from cpt_jax.data import shuffle


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4099])
def test_is_a_permutation(n):
  keys = shuffle.round_keys([0, n])
  out = shuffle.permute(np.arange(n), n, keys)
  assert sorted(out.tolist()) == list(range(n))
  np.testing.assert_array_equal(shuffle.permute(np.arange(n)[::-1], n, keys), out[::-1])


def test_keys_change_the_order_and_orders_look_uniform():
  n = 1000
  a = shuffle.permute(np.arange(n), n, shuffle.round_keys([0, 1]))
  b = shuffle.permute(np.arange(n), n, shuffle.round_keys([0, 2]))
  assert (a != b).mean() > 0.9
  assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.1  # not near the identity
  # Where item 0 of a 10-item set lands, over 3000 keys: every place about equally often.
  places = [int(np.argmax(shuffle.permute(np.arange(10), 10, shuffle.round_keys([k])) == 0))
            for k in range(3000)]
  counts = np.bincount(places, minlength=10)
  assert counts.min() > 230 and counts.max() < 370  # expected 300 each


def test_huge_domain_without_materialising():
  n = 10 ** 12  # a trillion rows: any position is a few hundred integer operations
  keys = shuffle.round_keys([3])
  pos = np.array([0, 1, n // 2, n - 1])
  out = shuffle.permute(pos, n, keys)
  assert ((out >= 0) & (out < n)).all() and len(set(out.tolist())) == 4
  with pytest.raises(IndexError):
    shuffle.permute(np.array([n]), n, keys)
