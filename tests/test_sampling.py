import numpy as np
import pytest

from verifier.sampling import SamplingParams, adjust_logits, choose_token, target_probs


def logits_with_order(values):
    return np.array(values, dtype=np.float32)


def test_greedy_is_argmax_and_leaves_logits_untouched():
    logits = logits_with_order([0.1, 3.0, 2.9, -1.0])
    params = SamplingParams(temperature=0.0)
    assert adjust_logits(logits, params, {}) is logits
    assert choose_token(logits, params, {}, np.random.default_rng(0)) == 1


def test_logit_bias_and_penalties_change_the_greedy_choice():
    logits = logits_with_order([0.0, 3.0, 2.9, -1.0])
    assert choose_token(logits, SamplingParams(temperature=0.0, logit_bias={1: -100.0}), {},
                        np.random.default_rng(0)) == 2
    penalised = SamplingParams(temperature=0.0, frequency_penalty=0.1)
    assert choose_token(logits, penalised, {1: 2}, np.random.default_rng(0)) == 2
    presence = SamplingParams(temperature=0.0, presence_penalty=0.2)
    assert choose_token(logits, presence, {1: 1}, np.random.default_rng(0)) == 2
    assert logits[1] == 3.0  # the caller's logits are not modified


def test_top_k_top_p_min_p_cut_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    top_k = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top_k, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-9)
    top_p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(top_p, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-9)
    top_p_exact = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert np.count_nonzero(top_p_exact) == 2
    min_p = target_probs(logits, SamplingParams(temperature=1.0, min_p=0.25))
    np.testing.assert_allclose(min_p, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-9)
    tiny_top_p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.0))
    np.testing.assert_allclose(tiny_top_p, [1, 0, 0, 0])


def test_temperature_sharpens_and_flattens():
    logits = np.log(np.array([0.6, 0.4]))
    cold = target_probs(logits, SamplingParams(temperature=0.5))
    hot = target_probs(logits, SamplingParams(temperature=2.0))
    assert cold[0] > 0.6 > hot[0] > 0.5


@pytest.mark.parametrize("temperature", [1e-3, 1e-200, 1e-307, 5e-324])
def test_a_tiny_temperature_is_near_greedy_not_nan(temperature):
    """logits / T overflows for T below ~1e-306: the distribution must still be the argmax
    (all of it on the top token, or shared by exact ties), never NaN."""
    logits = logits_with_order([10.0, 30.0, 29.0, -20.0, 29.99])  # real logits' sizes
    probs = target_probs(logits, SamplingParams(temperature=temperature))
    assert not np.isnan(probs).any()
    assert probs[1] > 0.99 and probs.sum() == pytest.approx(1.0)
    tie = target_probs(logits_with_order([20.0, 25.0, 25.0]),
                       SamplingParams(temperature=temperature))
    np.testing.assert_allclose(tie, [0.0, 0.5, 0.5])


def test_samples_follow_the_distribution_and_seeds_repeat():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.log(probs)
    params = SamplingParams(temperature=1.0, seed=7)
    rng = np.random.default_rng(params.seed)
    draws = [choose_token(logits, params, {}, rng) for _ in range(20000)]
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    # chi-square with 3 degrees of freedom; 16.3 is the 0.999 quantile
    chi2 = len(draws) * np.sum((frequencies - probs) ** 2 / probs)
    assert chi2 < 16.3
    again = np.random.default_rng(params.seed)
    assert [choose_token(logits, params, {}, again) for _ in range(200)] == draws[:200]


@pytest.mark.parametrize("token", [0, 3])
def test_zero_probability_tokens_are_never_drawn(token):
    probs = np.full(4, 1 / 3)
    probs[token] = 0.0
    logits = np.log(np.where(probs > 0, probs, 1e-300))
    params = SamplingParams(temperature=1.0, top_k=3)
    rng = np.random.default_rng(1)
    assert token not in {choose_token(logits, params, {}, rng) for _ in range(3000)}
