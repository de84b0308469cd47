"""tml.rl.objectives against hand computations."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from tml.rl import objectives as obj


def test_grpo_advantages_mean_and_std():
    r = jnp.array([[1.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    a = np.asarray(obj.group_advantages(r))
    # group 0: mean 1, population std sqrt((0 + 1 + 1 + 4) / 4) = sqrt(1.5)
    s = math.sqrt(1.5) + 1e-6
    np.testing.assert_allclose(a[0], [0.0, -1 / s, -1 / s, 2 / s], rtol=1e-6)
    assert np.all(a[1] == 0.0)  # equal rewards: no signal
    two = np.asarray(obj.group_advantages(jnp.array([[0.0, 1.0]])))
    np.testing.assert_allclose(two, [[-1.0, 1.0]], rtol=1e-5)


def test_grpo_without_std_and_drgrpo():
    r = jnp.array([[1.0, 0.0, 0.0, 3.0]])
    expect = [[0.0, -1.0, -1.0, 2.0]]
    assert np.array_equal(np.asarray(obj.group_advantages(r, std_normalize=False)), expect)
    assert np.array_equal(np.asarray(obj.group_advantages(r, estimator="drgrpo")), expect)
    assert np.array_equal(np.asarray(obj.group_advantages(r, estimator="drgrpo", std_normalize=True)), expect)
    with pytest.raises(ValueError, match="choose one of"):
        obj.group_advantages(r, estimator="ppo")
    with pytest.raises(ValueError, match=r"\[S groups, G episodes\]"):
        obj.group_advantages(jnp.ones(4))


def test_ppo_clip_by_hand():
    old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 2.0]]))
    adv = jnp.array([1.0])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, ratio, clipped = obj.ppo_clip(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    # r = 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped); r = 0.5: max(-0.5, -0.8) = -0.5 (not clipped);
    # r = 1.1: -1.1 both; masked slot: 0 and ratio 1
    np.testing.assert_allclose(np.asarray(loss), [[-1.2, -0.5, -1.1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ratio), [[1.5, 0.5, 1.1, 1.0]], rtol=1e-6)
    assert np.asarray(clipped).tolist() == [[True, False, False, False]]
    # negative advantage: r = 0.5 is clipped at 0.8 (loss max(0.5, 0.8) = 0.8)
    loss, _, clipped = obj.ppo_clip(logp, old, -adv, mask)
    np.testing.assert_allclose(np.asarray(loss), [[1.5, 0.8, 1.1, 0.0]], rtol=1e-6)
    assert np.asarray(clipped).tolist() == [[False, True, False, False]]


def test_ratio_is_exactly_one_when_logprobs_are_equal():
    lp = jnp.array([[-1.234567, -0.5, -7.0]])
    _, ratio, clipped = obj.ppo_clip(lp, lp, jnp.array([2.0]), jnp.ones((1, 3)))
    assert np.asarray(ratio).tolist() == [[1.0, 1.0, 1.0]] and not np.asarray(clipped).any()
    assert np.asarray(obj.truncated_is_weights(lp, lp, jnp.ones((1, 3)), 2.0)).tolist() == [[1.0, 1.0, 1.0]]


def test_kl_k3_by_hand():
    logp = jnp.log(jnp.array([[0.5, 0.2]]))
    ref = jnp.log(jnp.array([[0.25, 0.2]]))
    kl = np.asarray(obj.kl_k3(logp, ref, jnp.array([[1, 1]])))
    # d = log(0.25 / 0.5) = -log 2: e^d - d - 1 = 0.5 + log 2 - 1
    np.testing.assert_allclose(kl, [[0.5 + math.log(2) - 1, 0.0]], rtol=1e-6, atol=1e-7)
    assert np.asarray(obj.kl_k3(logp, ref, jnp.array([[0, 1]]))).tolist() == [[0.0, 0.0]]


def test_truncated_is_weights_cap():
    t = jnp.log(jnp.array([[3.0, 0.5, 1.0]]))
    s = jnp.zeros((1, 3))
    w = np.asarray(obj.truncated_is_weights(t, s, jnp.array([[1, 1, 0]]), cap=2.0))
    np.testing.assert_allclose(w, [[2.0, 0.5, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="cap must be > 0"):
        obj.truncated_is_weights(t, s, jnp.ones((1, 3)), cap=0.0)


def test_aggregations_by_hand():
    x = jnp.array([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(obj.aggregate(x, m, "token_mean")) == pytest.approx((1 + 3 + 4) / 3)
    assert float(obj.aggregate(x, m, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    assert float(obj.aggregate(x, m, "seq_sum_const", constant=4.0)) == pytest.approx(8 / (2 * 4))
    with pytest.raises(ValueError, match="choose one of"):
        obj.aggregate(x, m, "sum")


def test_entropy_by_hand():
    p = jnp.array([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]])
    h = np.asarray(obj.entropy(jnp.log(p)))
    np.testing.assert_allclose(h, [1.5 * math.log(2), 0.0], atol=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum_const"])
def test_aggregation_weights_are_aggregate_and_split_over_rows(mode):
    """sum(w * x) == aggregate(x) over the batch, and the row-wise split (the learner's
    micro-batches) sums to the same; an empty row gets weight 0."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0] * 6, [0, 0, 1, 0, 1, 0]], np.float32)
    w = obj.aggregation_weights(mask, mode, constant=5.0)
    assert w.dtype == np.float32 and np.all(w[2] == 0) and np.all(w[mask == 0] == 0)
    want = float(obj.aggregate(jnp.asarray(x), jnp.asarray(mask), mode, constant=5.0))
    np.testing.assert_allclose(float(np.sum(w * x)), want, rtol=1e-6)
    np.testing.assert_allclose(sum(float(np.sum(w[i] * x[i])) for i in range(4)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="choose one of"):
        obj.aggregation_weights(mask, "sum")
