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
    (lambda c, K, V, q: c.read(0, 0, tier=8.0), ValueError, "tier: expected 8, 12 or 16"),
    (lambda c, K, V, q: c.plane("k_top", 0), ValueError, "name: expected one of"),
    (lambda c, K, V, q: c.attend(0, q, mode=np.array(["full"])), ValueError,
     "mode: expected one of"),
    (lambda c, K, V, q: c.attend(0, q, rule="bogus"), ValueError, "rule: unknown named rule"),
    (lambda c, K, V, q: c.append(0, K, V, counts=[1]), ValueError,
     r"counts: expected shape \[2\] \(one per sequence\), got \[1\]"),
    (lambda c, K, V, q: c.append(0, K, V, counts=[71, 0]), ValueError,
     r"counts: each must lie in \[0, 70\]"),
    (lambda c, K, V, q: c.append(0, K, V, counts=[-1, 3]), ValueError,
     r"counts: each must lie in \[0, 70\]"),
    (lambda c, K, V, q: c.append(0, K, V, counts=[1.0, 2.0]), TypeError,
     "counts: expected integers, got float64"),
    (lambda c, K, V, q: c.append(0, K, V, counts=[True, False]), TypeError,
     "counts: expected integers, got bool"),
    (lambda c, K, V, q: c.append(0, K, V, counts=np.zeros(2, np.int32)), ValueError,
     "counts: appends no token"),
    (lambda c, K, V, q: c.append(0, K, V, counts="12"), TypeError,
     r"counts: expected a host integer array \[2\], got str"),
    (lambda c, K, V, q: c.append(0, K, V, counts=[]), ValueError,
     r"counts: expected shape \[2\] \(one per sequence\), got \[0\]"),
    (lambda c, K, V, q: c.append(0, K, V, counts=np.array([1, 2], "m8[s]")), TypeError,
     "counts: expected integers, got timedelta64"),
    (lambda c, K, V, q: c.append(0, K, V, counts=np.ma.array([1, 2], mask=[0, 1])), TypeError,
     "counts: expected a plain integer array, got a masked array"),
    # a masked K would have its mask ignored (every row appended)
    (lambda c, K, V, q: c.append(0, np.ma.masked_array(K, mask=True), V), TypeError,
     "k: expected a plain array, got a numpy masked array"),
    (lambda c, K, V, q: c.attend(0, np.ma.masked_array(q)), TypeError,
     "q: expected a plain array, got a numpy masked array"),
    # one sequence past the capacity: named, and nothing is written to the other either
    (lambda c, K, V, q: c.append(0, np.concatenate([K] * 3, 2), np.concatenate([V] * 3, 2),
                                 counts=[1, 190]), ValueError,
     "appending 190 tokens to sequence 1 of layer 0 would hold 260 tokens, past the capacity"),
    # a read-only output is refused before the call, so the counters do not move either
    (lambda c, K, V, q: c.attend(0, q, count=True, out=_read_only((2, 4, 64))), ValueError,
     "out: expected a writable array"),
])
def test_bad_input_names_the_argument_and_changes_nothing(cache, rng, call, error, match):
    K, V = kv(rng, 2, 2, 70, 64)
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    snap = snapshot(cache)
    counters = cache.counters()
    with pytest.raises(error, match=match):
        call(cache, K, V, q)
    assert_unchanged(cache, snap)
    assert cache.counters() == counters


def _read_only(shape):
    out = np.zeros(shape, np.float16)
    out.flags.writeable = False
    return out


class _HostDLPack:
    """A host array seen only through the DLPack protocol (no numpy or torch type)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


# describe() reads DLPack objects through cuda.core's StridedMemoryView constructor, which
# cuda.core 1.2 marks deprecated; it is the path the GPU tests ran, so it stays for now
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_host_dlpack_objects_are_read_in_place(cache, rng):
    K, V = kv(rng, 2, 2, 5, 64)
    ref = AlignedKVCache(2, 2, 64, 200, num_query_heads=4, batch_size=2, backend="numpy")
    for c in (ref, cache):
        c.reset()
    cache.append(0, _HostDLPack(K), _HostDLPack(V))
    ref.append(0, K, V)
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    assert np.array_equal(cache.attend(0, _HostDLPack(q)), ref.attend(0, q))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=0), "num_layers"), (dict(head_dim=96), "head_dim"),
    (dict(head_dim=64.0), "head_dim"),
    (dict(num_query_heads=5), "not a multiple"), (dict(num_query_heads=40), "GQA group"),
    (dict(max_seq_len=-3), "max_seq_len"), (dict(backend="tpu"), "backend"),
    (dict(block_table=np.zeros((2, 4), np.int32)), "block_table: a physical block"),
    (dict(block_table=np.arange(4).reshape(2, 2)), r"block_table: expected shape \[2, >= 4\]"),
    (dict(block_table=np.arange(8).reshape(2, 4), num_blocks=5), r"entries must lie in \[0, 5\)"),
    (dict(block_table=np.arange(8).reshape(2, 4) - 1), r"block_table: entries must be >= 0 "
                                                       r"\(physical block numbers\), got -1"),
    # entries past int32 are refused, not wrapped by the int32 copy
    (dict(block_table=np.arange(8, dtype=np.int64).reshape(2, 4) + 2**32),
     r"block_table: entries must lie in \[0, 2147483647\)"),
    (dict(block_table=np.array([[2**63, 1, 2, 3], [4, 5, 6, 7]], np.uint64)),
     r"block_table: entries must lie in"),
    (dict(block_table=[[0, 1, 2, 3], [4, 5, 6]]), r"block_table: expected a host integer array"),
    (dict(block_table=np.arange(8).reshape(2, 4).astype("m8[s]")),
     "block_table: expected integers, got timedelta64"),
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


def test_strict_reads_all_16_bits_on_this_call_only(rng):
    """strict=True equals mode="full" bit for bit (output and bytes counted), and differs
    from the aligned read where that truncates."""
    B, Hk, Hq, D, n = 2, 2, 6, 64, 300
    cache = AlignedKVCache(1, Hk, D, n, num_query_heads=Hq, batch_size=B, backend="numpy")
    K, V = kv(rng, B, Hk, n, D)
    K[..., 7] *= np.float16(40)               # an outlier channel: lower tiers elsewhere
    cache.append(0, K, V)
    q = (rng.standard_normal((B, Hq, D)) * 2).astype(np.float16)
    results = {}
    for name, kwargs in (("full", dict(mode="full")), ("strict", dict(strict=True)),
                         ("aligned", dict()), ("aligned_np", dict(strict=np.False_))):
        cache.reset_counters()
        out, dbg = cache.attend(0, q, count=True, debug=True, **kwargs)
        results[name] = (out, cache.counters(), dbg)
    full, strict, aligned = results["full"], results["strict"], results["aligned"]
    assert np.array_equal(strict[0].view(np.uint16), full[0].view(np.uint16))
    assert strict[1] == full[1] and strict[1]["bits_per_value"]["v"] == 16.0
    assert all((t == 16).all() for t in strict[2]["k_tiers"] + strict[2]["v_tiers"])
    # the aligned read truncated something here, and its output differs
    assert any((t < 16).any() for t in aligned[2]["k_tiers"] + aligned[2]["v_tiers"])
    assert not np.array_equal(aligned[0], strict[0])
    assert aligned[1]["bits_per_value"]["total"] < strict[1]["bits_per_value"]["total"]
    assert np.array_equal(results["aligned_np"][0], aligned[0])
    # strict overrides mode, on this call only
    assert np.array_equal(cache.attend(0, q, mode="aligned", strict=True), full[0])
    assert np.array_equal(cache.attend(0, q), aligned[0])


@pytest.mark.parametrize("name", ["strict", "count", "debug"])
@pytest.mark.parametrize("value", [1, 0, "yes", "no", None, 1.0])
def test_flags_must_be_bools(cache, rng, name, value):
    """A truthy string must not turn on counting or the debug tuple (nor strict)."""
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    snap = snapshot(cache)
    with pytest.raises(TypeError, match=f"{name}: expected a bool"):
        cache.attend(0, q, **{name: value})
    assert_unchanged(cache, snap)


def test_rule_by_name(rng):
    """``rule="tuned"`` (cache or call) is ``reference.RULES["tuned"]``; a typo is an error."""
    from akv_runtime.reference import TUNED_RULE
    K = rng.standard_normal((1, 2, 80, 64)).astype(np.float16)
    V = rng.standard_normal((1, 2, 80, 64)).astype(np.float16)
    q = rng.standard_normal((1, 2, 64)).astype(np.float16)
    by_name = AlignedKVCache(1, 2, 64, 128, backend="numpy", rule="tuned")
    by_object = AlignedKVCache(1, 2, 64, 128, backend="numpy", rule=TUNED_RULE)
    assert by_name.rule == TUNED_RULE
    for c in (by_name, by_object):
        c.append(0, K, V)
    assert np.array_equal(by_name.attend(0, q), by_object.attend(0, q))
    assert np.array_equal(by_object.attend(0, q, rule="seed"),
                          by_object.attend(0, q, rule=R.SEED_RULE))
    with pytest.raises(ValueError, match="unknown named rule 'tunde'"):
        by_name.attend(0, q, rule="tunde")
    with pytest.raises(TypeError, match="AlignmentRule or a rule name"):
        AlignedKVCache(1, 2, 64, 128, backend="numpy", rule=3)


def test_a_cache_too_large_for_host_memory_says_why():
    """numpy's own MemoryError named an array shape; the cache's names its arguments and the
    bytes its planes would need (the identity block table, or the planes themselves)."""
    with pytest.raises(MemoryError, match=r"max_seq_len: the planes of 2 layers .* GiB"):
        AlignedKVCache(2, 2, 64, 10**15, backend="numpy")
    table = np.arange(2, dtype=np.int32).reshape(1, 2)
    with pytest.raises(MemoryError, match=r"block_table: the planes of 2 layers x 10000000000000"):
        AlignedKVCache(2, 2, 64, 128, backend="numpy", block_table=table, num_blocks=10**13)
    # planes sized by a large physical block number name the block table, not max_seq_len
    with pytest.raises(MemoryError, match=r"block_table: the planes of 2 layers x 2000000001 "):
        AlignedKVCache(2, 2, 64, 128, backend="numpy",
                       block_table=np.array([[0, 2 * 10**9]], np.int64))


def test_ragged_append_gives_each_sequence_its_own_length(rng):
    """append(counts=...): sequence b takes the first counts[b] of the padded new tokens, so
    a batch holds sequences of different lengths (here 5, 0 and 67 tokens, then one decode
    token each: 6, 1 and 68, across a block edge). Each sequence reads back bit for bit,
    and its attention output equals that of a one-sequence cache holding the same tokens."""
    B, Hk, Hq, D, S = 3, 2, 4, 64, 70
    cache = AlignedKVCache(1, Hk, D, 200, num_query_heads=Hq, batch_size=B, backend="numpy")
    K, V = kv(rng, B, Hk, S, D)
    counts = np.array([5, 0, 67])
    cache.append(0, K, V, counts=counts)
    assert cache.lengths()[0].tolist() == [5, 0, 67]
    k1, v1 = kv(rng, B, Hk, 1, D)
    cache.append(0, k1, v1)
    assert cache.lengths()[0].tolist() == [6, 1, 68]
    q = rng.standard_normal((B, Hq, D)).astype(np.float16)
    out = cache.attend(0, q, mode="aligned")
    for b in range(B):
        want_k = np.concatenate([K[b, :, :counts[b]], k1[b]], 1)
        want_v = np.concatenate([V[b, :, :counts[b]], v1[b]], 1)
        got_k, got_v = cache.read(0, b)
        assert np.array_equal(got_k.view(np.uint16), want_k.view(np.uint16))
        assert np.array_equal(got_v.view(np.uint16), want_v.view(np.uint16))
        alone = AlignedKVCache(1, Hk, D, 200, num_query_heads=Hq, batch_size=1,
                               backend="numpy")
        alone.append(0, want_k[None], want_v[None])
        assert np.array_equal(alone.attend(0, q[b:b + 1], mode="aligned").view(np.uint16),
                              out[b:b + 1].view(np.uint16))


def test_block_table_is_copied_and_read_only(rng):
    """The cache checks its block table once, so it keeps a copy: a later change to the
    caller's array cannot reach it (it used to share an int32 array's memory), and the
    cache's own copy refuses writes."""
    table = np.array([[3, 0], [1, 2]], np.int32)
    cache = AlignedKVCache(1, 1, 64, 128, batch_size=2, block_table=table, backend="numpy")
    assert not np.shares_memory(cache.block_table, table)
    table[1, 0] = 3                                   # would alias sequence 0's first block
    assert cache.block_table.tolist() == [[3, 0], [1, 2]]
    with pytest.raises(ValueError, match="read-only"):
        cache.block_table[1, 0] = 3
    with pytest.raises(AttributeError):                # nor can it be replaced unchecked
        cache.block_table = np.array([[0, 1], [99, 2]], np.int32)
    K, V = kv(rng, 2, 1, 3, 64)
    cache.append(0, K, V)
    for b in range(2):
        assert np.array_equal(cache.read(0, b)[0].view(np.uint16), K[b].view(np.uint16))


@pytest.mark.parametrize("bad", ["sometimes", "AUTO", None, 1, True])
def test_v_rule_must_be_a_known_policy(rng, bad):
    with pytest.raises(ValueError, match="v_rule: expected one of"):
        AlignedKVCache(1, 2, 64, 128, backend="numpy", v_rule=bad)
    cache = AlignedKVCache(1, 2, 64, 128, backend="numpy")
    assert cache.v_rule == "auto"                            # the default
    with pytest.raises(ValueError, match="v_rule: expected one of"):
        cache.v_rule = bad
    assert cache.v_rule == "auto"                            # unchanged by the refusal
    with pytest.raises(ValueError, match="v_rule: expected one of"):
        R.v_rule_applies(bad, 1, 1, 64, 64)


def test_v_rule_auto_threshold_is_the_whole_v_bytes():
    """``auto`` applies the V rule above V_RULE_MIN_BYTES of V read whole (batch x KV heads
    x the longest sequence's whole blocks x head_dim x 2 bytes), not at or below it."""
    limit = R.V_RULE_MIN_BYTES
    assert limit == 128 << 20
    # Llama-3-8B shapes: 8 KV heads x 128 channels; 8 x 8192 tokens is exactly 128 MiB
    assert not R.v_rule_applies("auto", 8, 8, 128, 8192)
    assert R.v_rule_applies("auto", 8, 8, 128, 8193)         # a 129th block: above
    assert not R.v_rule_applies("auto", 8, 8, 128, 4096)     # 8 x 4k: 64 MiB
    assert not R.v_rule_applies("auto", 32, 3, 64, 4096)     # SmolLM2 32 x 4k: 48 MiB
    assert not R.v_rule_applies("auto", 8, 3, 64, 32768)     # SmolLM2 8 x 32k: 96 MiB
    assert R.v_rule_applies("auto", 32, 3, 64, 32768)        # SmolLM2 32 x 32k: 384 MiB
    assert not R.v_rule_applies("auto", 1, 8, 128, 4096)     # Llama-3-8B 1 x 4k: 8 MiB
    assert not R.v_rule_applies("auto", 1, 32, 128, 16384)   # Llama-2-7B 1 x 16k: 128 MiB
    assert R.v_rule_applies("auto", 8, 32, 128, 4096)        # Llama-2-7B 8 x 4k: 256 MiB
    assert R.v_rule_applies("always", 1, 1, 64, 1)
    assert not R.v_rule_applies("never", 64, 8, 128, 1 << 20)


def test_v_whole_call_reads_v_whole_and_skips_the_estimate(rng):
    """An aligned call left out of the V rule (``auto`` at this size, or ``never``): K at the
    rule's tiers, every V token at 16 bits, no estimate rows counted; the output equals the
    reference's ``v_whole`` twin bit for bit and is no further from float64 attention than
    the V rule's. ``always`` on the same cache runs the V rule (lower V tiers)."""
    B, Hk, Hq, D, n = 2, 2, 6, 64, 300
    cache = AlignedKVCache(1, Hk, D, n, num_query_heads=Hq, batch_size=B, backend="numpy",
                           rule="tuned")
    K, V = kv(rng, B, Hk, n, D)
    K[..., 7] *= np.float16(40)
    cache.append(0, K, V)
    q = (rng.standard_normal((B, Hq, D)) * 2).astype(np.float16)
    assert not cache.v_rule_applies(0)
    runs = {}
    for policy in ("auto", "never", "always"):
        cache.v_rule = policy
        cache.reset_counters()
        out, dbg = cache.attend(0, q, count=True, debug=True)
        runs[policy] = (out, cache.counters(), dbg)
    auto, never, always = runs["auto"], runs["never"], runs["always"]
    assert np.array_equal(auto[0].view(np.uint16), never[0].view(np.uint16))
    assert auto[1] == never[1]
    assert all((t == 16).all() for t in auto[2]["v_tiers"])
    assert any((t < 16).any() for t in auto[2]["k_tiers"])
    assert any((t < 16).any() for t in always[2]["v_tiers"])
    assert auto[1]["bits_per_value"]["v"] == 16.0 > always[1]["bits_per_value"]["v"]
    nblk = -(-n // 64)
    # metadata: the K exponent maxima only; the V rule adds the V maxima and the
    # estimate's hi rows
    assert auto[1]["metadata_bytes"] == B * D * nblk * Hk
    assert always[1]["metadata_bytes"] == B * (2 * D * nblk * Hk + D * Hq * min(32, nblk))
    planes = cache._backend.layer_planes(0)
    twin = R.decode_attention(planes, q, cache.block_table, cache.lengths(0), "aligned",
                              cache.rule, v_whole=True)
    assert np.array_equal(twin.output.view(np.uint16), auto[0].view(np.uint16))
    for b in range(B):
        exact = R.float64_attention(q[b], K[b], V[b])
        # the V-whole output is at least as close to float64 as the V rule's (V exact)
        assert R.relative_error(auto[0][b], exact) <= 1.05 * R.relative_error(always[0][b],
                                                                             exact) + 1e-4


def test_sparse_torch_tensors_are_refused_by_name(cache, rng):
    torch = pytest.importorskip("torch")
    K, V = kv(rng, 2, 2, 3, 64)
    snap = snapshot(cache)
    with pytest.raises(TypeError, match="v: expected a dense \\(strided\\) tensor, got layout "
                                        "sparse_coo"):
        cache.append(0, torch.from_numpy(K), torch.from_numpy(V).to_sparse())
    assert_unchanged(cache, snap)


def test_a_closed_cache_refuses_every_call(cache, rng):
    """close() (or the end of a with-block) frees the buffers; later calls raise ValueError
    instead of running on freed memory; lengths() and close() still work."""
    K, V = kv(rng, 2, 2, 3, 64)
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    lengths = cache.lengths()
    cache.close()
    calls = [lambda: cache.append(0, K, V), lambda: cache.attend(0, q),
             lambda: cache.read(0, 0), lambda: cache.plane("k_hi", 0), lambda: cache.v_lo(1),
             cache.counters, cache.reset_counters, cache.reset,
             lambda: cache.v_rule_applies(0)]
    for call in calls:
        with pytest.raises(ValueError, match="the cache is closed"):
            call()
    assert np.array_equal(cache.lengths(), lengths)
    assert np.array_equal(cache.lengths(0), lengths[0])
    cache.close()                                        # idempotent
    with AlignedKVCache(1, 2, 64, 64, backend="numpy") as other:
        other.append(0, *kv(rng, 1, 2, 5, 64))
    with pytest.raises(ValueError, match="the cache is closed"):
        other.read(0, 0)
