"""CPU tests of AlignedKVCache on the numpy backend: the API, bad input, paging."""

import numpy as np
import pytest

from akv_runtime import reference as R
from akv_runtime.cache import AlignedKVCache
from akv_runtime.layout import PLANE_NAMES


def kv(rng, B, Hk, S, D):
    return (rng.standard_normal((B, Hk, S, D)).astype(np.float16),
            rng.standard_normal((B, Hk, S, D)).astype(np.float16))


def snapshot(cache):
    return {n: a.copy() for n, a in cache._backend.planes.items()}, cache.lengths()


def assert_unchanged(cache, snap):
    planes, lengths = snap
    for n in PLANE_NAMES:
        assert np.array_equal(cache._backend.planes[n], planes[n])
    assert np.array_equal(cache.lengths(), lengths)


@pytest.fixture
def cache(rng):
    c = AlignedKVCache(2, 2, 64, 200, num_query_heads=4, batch_size=2, backend="numpy")
    K, V = kv(rng, 2, 2, 70, 64)
    c.append(0, K, V)
    return c


@pytest.mark.parametrize("call,error,match", [
    (lambda c, K, V, q: c.append(0, K.astype(np.float32), V), TypeError, "k: expected dtype float16"),
    (lambda c, K, V, q: c.append(0, K, V[:, :, :3]), ValueError, "v: shape"),
    (lambda c, K, V, q: c.append(0, K[:1], V[:1]), ValueError, r"k: expected shape \[2, 2, \*, 64\]"),
    (lambda c, K, V, q: c.append(2, K, V), ValueError, "layer: 2 is out of range"),
    (lambda c, K, V, q: c.append(-1, K, V), ValueError, "layer: -1 is out of range"),
    (lambda c, K, V, q: c.append(1.0, K, V), TypeError, "layer: expected an int"),
    (lambda c, K, V, q: c.append(0, K.tolist(), V), TypeError, "k: expected a numpy array"),
    (lambda c, K, V, q: c.append(0, np.concatenate([K] * 3, 2), np.concatenate([V] * 3, 2)),
     ValueError, "past the capacity of 256"),
    (lambda c, K, V, q: c.attend(0, q[:, :3]), ValueError, r"q: expected shape \[2, 4, 64\]"),
    (lambda c, K, V, q: c.attend(0, q, mode="fast"), ValueError, "mode: expected one of"),
    (lambda c, K, V, q: c.attend(1, q), ValueError, "holds no tokens"),
    (lambda c, K, V, q: c.attend(0, q, out=np.zeros((2, 4, 64), np.float32)), TypeError,
     "out: expected dtype float16"),
    (lambda c, K, V, q: c.read(0, 5), ValueError, "sequence: 5 is out of range"),
    (lambda c, K, V, q: c.read(0, "0"), TypeError, "sequence: expected an int"),
    (lambda c, K, V, q: c.read(0, 0.5), TypeError, "sequence: expected an int"),
    (lambda c, K, V, q: c.read(0, 0, tier=10), ValueError, "tier: expected 8, 12 or 16"),
    (lambda c, K, V, q: c.plane("k_top", 0), ValueError, "name: expected one of"),
])
def test_bad_input_names_the_argument_and_changes_nothing(cache, rng, call, error, match):
    K, V = kv(rng, 2, 2, 70, 64)
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    snap = snapshot(cache)
    with pytest.raises(error, match=match):
        call(cache, K, V, q)
    assert_unchanged(cache, snap)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=0), "num_layers"), (dict(head_dim=96), "head_dim"),
    (dict(head_dim=64.0), "head_dim"),
    (dict(num_query_heads=5), "not a multiple"), (dict(num_query_heads=40), "GQA group"),
    (dict(max_seq_len=-3), "max_seq_len"), (dict(backend="tpu"), "backend"),
    (dict(block_table=np.zeros((2, 4), np.int32)), "block_table: a physical block"),
    (dict(block_table=np.arange(4).reshape(2, 2)), r"block_table: expected shape \[2, >= 4\]"),
    (dict(block_table=np.arange(8).reshape(2, 4), num_blocks=5), r"entries must lie in \[0, 5\)"),
])
def test_impossible_caches_are_refused(kwargs, match):
    args = dict(num_layers=1, num_kv_heads=4, head_dim=64, max_seq_len=256, batch_size=2,
                backend="numpy")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        AlignedKVCache(**args)


def test_paged_cache_equals_contiguous_cache(rng):
    """A shuffled block table gives the same attention as the identity table."""
    B, Hk, D = 2, 2, 128
    table = rng.permutation(20)[:8].reshape(B, 4).astype(np.int32)
    paged = AlignedKVCache(1, Hk, D, 256, batch_size=B, block_table=table, num_blocks=20,
                           backend="numpy")
    flat = AlignedKVCache(1, Hk, D, 256, batch_size=B, backend="numpy")
    for S in (100, 1, 1, 90):
        K, V = kv(rng, B, Hk, S, D)
        paged.append(0, K, V)
        flat.append(0, K, V)
    q = rng.standard_normal((B, Hk, D)).astype(np.float16)
    for mode in ("full", "aligned"):
        assert np.array_equal(paged.attend(0, q, mode=mode), flat.attend(0, q, mode=mode))
    for b in range(B):
        assert np.array_equal(paged.read(0, b)[0], flat.read(0, b)[0])


def test_torch_cpu_tensors_in_and_out(rng):
    torch = pytest.importorskip("torch")
    cache = AlignedKVCache(1, 2, 64, 128, num_query_heads=6, backend="numpy")
    K, V = kv(rng, 1, 2, 50, 64)
    cache.append(0, torch.from_numpy(K), torch.from_numpy(V))
    q = torch.randn(1, 6, 64).half()
    out = cache.attend(0, q, mode="full")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float16
    exact = R.float64_attention(q[0].numpy(), K[0], V[0])
    assert R.relative_error(out[0].numpy(), exact) < 1e-3
    buf = torch.empty(1, 6, 64, dtype=torch.float16)
    assert cache.attend(0, q, out=buf) is buf


def test_counters_and_reset(cache, rng):
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    cache.reset_counters()
    cache.attend(0, q, count=True)
    c = cache.counters()
    assert c["values"] == 2 * 70 * 2 * 64
    assert 8 <= c["bits_per_value"]["v"] <= 16
    cache.attend(0, q)                       # not counted
    assert cache.counters()["values"] == c["values"]
    cache.reset()
    assert cache.lengths().sum() == 0
    with pytest.raises(ValueError, match="holds no tokens"):
        cache.attend(0, q)
