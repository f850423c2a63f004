// Decode kernels, version 3: version 2's loads and arithmetic, but each CTA serves a split of
// up to kMaxScoreSplit (scores) or kMaxSplit (values) consecutive blocks of one (sequence, KV
// head); the host picks each kernel's split from its occupancy (kernels.choose_split). Everything a block needs
// before its plane loads (block table entry, exponent maxima, tiers, weights) is fetched for
// the whole split at once in the prologue, so the chain of dependent global loads is paid
// once per split instead of once per block, and the next block's planes are loaded while the
// current one is reduced (scores) or computed (values). The values kernel keeps one partial
// output per split, so the combine step reads `split_blocks` times fewer partials.
// Numerics: the same tiers and the same per-block statistics as versions 1 and 2; the output
// differs only in fp32 summation order.
//
// Version 4 is the same code with STAGES > 0: the planes go global -> shared memory with
// cp.async (16 bytes per thread-instruction, only the rows a tier needs) through a pipeline of
// STAGES buffers of 2*T*D bytes in dynamic shared memory (STAGES - 1 blocks in flight per
// CTA), so the bytes in flight do not occupy registers. Instantiated for GQA groups up to 4.
// Every iteration commits one cp.async group (empty past the split's end), so
// `cp.async.wait_group STAGES-2` always means "block j has landed".
#pragma once
#include "akv_decode_v2.cuh"

namespace akv3 {

using akv2::kFull;
using akv2::rs_step;
using akv2::tier_words;
using akv2::unpack16;
constexpr int kMaxSplit = 8;        // values kernels: blocks per CTA (one partial per split)
constexpr int kMaxScoreSplit = 16;  // scores kernels: per-block outputs, so a split of its own

// cp.async exists from sm_80 on; older targets (sm_75) copy synchronously through registers,
// which keeps every entry point in every cubin (the pipeline is then just a loop).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
extern __shared__ __align__(16) uint8_t akv_dynamic_smem[];

template <int R>
struct Planes {
  uint4 hi[R];
  uint2 mid[R], lo[R];
  int tier[R];
};

// ------------------------------------------------------------------------------- scores
// The scores kernels' prologue (versions 3-8): for a split of `count` blocks from block
// `first` of sequence b, KV head h, hands each q value of the group to qstore(g, i, q_gi)
// and fills s_eq (q's exponent fields, at least 1), s_phys (physical blocks) and s_tier
// (each (block, channel) K tier; rule: DESIGN.md section 4, docs/design.md; up to group 3
// the K exponent maxima go to registers of the threads that use them, with no shared
// copy). after_phys() runs once the physical blocks are known and before the exponent
// maxima are read: the kernels issue the first block's hi plane there (tier 8 is
// always read), so it travels with the exponent maxima instead of after the tiers
// (docs/perf-notes.md). Adds the split's K bytes to `counters`. Ends synchronised.
template <int D, int G, int MS, class QStore, class AfterPhys>
__device__ __forceinline__ void score_prologue(
    int b, int h, int n, int first, int count, const __half* __restrict__ q, long long q_sb,
    long long q_sh, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ k_exp, int num_kv_heads, int full_mode, int t8, int t12,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ k_tier_map,
    int (&s_eq)[G][D], uint8_t (&s_tier)[MS][D], int (&s_phys)[MS], QStore&& qstore,
    AfterPhys&& after_phys) {
  constexpr int T = AKV_BLOCK_TOKENS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i < D; i += 128) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const __half qh = q[b * q_sb + (long long)(h * G + g) * q_sh + i];
      qstore(g, i, qh);
      s_eq[g][i] = max((__half_as_ushort(qh) >> 10) & 0x1F, 1);
    }
  }
  if (tid < count) s_phys[tid] = block_table[(long long)b * blocks_per_seq + first + tid];
  __syncthreads();
  after_phys();
  if constexpr (G <= 3) {
    // TPB threads per block j of the split (tid = TPB j + slice), DS consecutive channels
    // each: their K exponent maxima in one 16- or 8-byte load, straight into registers;
    // a_g = max_i (E(q_gi) + ek_i) as a max over the TPB lanes (shuffles; every lane takes
    // part); then each channel's tier, the group's highest = the tier of its smallest gap
    // (the tier falls as the gap grows: t8 >= t12), packed four to a word
    constexpr int TPB = 128 / MS, DS = D / TPB;
    static_assert(128 % MS == 0 && (DS == 8 || DS == 16), "128 threads over the split");
    const int j = tid / TPB, d0 = (tid % TPB) * DS;
    uint32_t w[DS / 4];
#pragma unroll
    for (int k = 0; k < DS / 4; ++k) w[k] = 0u;
    const long long row = (((long long)b * num_kv_heads + h) * blocks_per_seq + first + j) * D;
    if (j < count) {
      const uint8_t* src = k_exp + ((long long)s_phys[j] * num_kv_heads + h) * D + d0;
      if constexpr (DS == 16) {
        const uint4 x = *reinterpret_cast<const uint4*>(src);
        w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
      } else {
        const uint2 x = *reinterpret_cast<const uint2*>(src);
        w[0] = x.x, w[1] = x.y;
      }
    }
    // channel k's exponent maximum, unpacked where it is used (fewer live registers)
    auto ek = [&](int k) { return (int)((w[k / 4] >> (8 * (k % 4))) & 0xFF); };
    int amax[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      int m = 0;
#pragma unroll
      for (int k = 0; k < DS; ++k) m = max(m, s_eq[g][d0 + k] + ek(k));
#pragma unroll
      for (int o = TPB / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
      amax[g] = m;
    }
    // gap_gk = a_g - (E(q_gk) + ek_k); min over g = min_g (a_g - E(q_gk)) - ek_k
    int gap[DS];
#pragma unroll
    for (int k = 0; k < DS; ++k) gap[k] = 0x7fffffff;
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int k = 0; k < DS; ++k) gap[k] = min(gap[k], amax[g] - s_eq[g][d0 + k]);
    uint32_t out[DS / 4];
#pragma unroll
    for (int k = 0; k < DS / 4; ++k) out[k] = 0u;
#pragma unroll
    for (int k = 0; k < DS; ++k) {
      const int tier = full_mode || ek(k) == AKV_SPECIAL_EXPONENT
                           ? 16 : akv_tier_from_gap(gap[k] - ek(k), t8, t12);
      out[k / 4] |= (uint32_t)tier << (8 * (k % 4));
    }
    if (j < count) {
      if constexpr (DS == 16) {
        const uint4 x = make_uint4(out[0], out[1], out[2], out[3]);
        *reinterpret_cast<uint4*>(&s_tier[j][d0]) = x;
        if (k_tier_map) *reinterpret_cast<uint4*>(k_tier_map + row + d0) = x;
      } else {
        const uint2 x = make_uint2(out[0], out[1]);
        *reinterpret_cast<uint2*>(&s_tier[j][d0]) = x;
        if (k_tier_map) *reinterpret_cast<uint2*>(k_tier_map + row + d0) = x;
      }
    }
  } else {
    // groups above 3: the exponent maxima through shared memory, a_g by one warp per
    // (block, head), tiers by channel. Measured faster than the branch above from group 4
    // on (Llama-3-8B 1 x 16k, Llama-3-70B shape 8 x 16k: the branch above was 15 and 10 %
    // slower in the scores phase; docs/perf-notes.md, seventh session)
    __shared__ uint8_t s_kexp[MS][D];
    __shared__ int s_amax[MS][G];
    for (int idx = tid; idx < count * D; idx += 128) {
      const int j = idx / D, i = idx % D;
      s_kexp[j][i] = k_exp[((long long)s_phys[j] * num_kv_heads + h) * D + i];
    }
    __syncthreads();
    for (int jg = warp; jg < count * G; jg += 4) {
      const int j = jg / G, g = jg % G;
      int m = 0;
      for (int i = lane; i < D; i += 32) m = max(m, s_eq[g][i] + s_kexp[j][i]);
      m = akv_warp_max_int(m);
      if (lane == 0) s_amax[j][g] = m;
    }
    __syncthreads();
    for (int idx = tid; idx < count * D; idx += 128) {
      const int j = idx / D, i = idx % D;
      const int ek = s_kexp[j][i];
      int tier = 8;
      if (full_mode || ek == AKV_SPECIAL_EXPONENT) {
        tier = 16;
      } else {
#pragma unroll
        for (int g = 0; g < G; ++g)
          tier = max(tier, akv_tier_from_gap(s_amax[j][g] - (s_eq[g][i] + ek), t8, t12));
      }
      s_tier[j][i] = tier;
      if (k_tier_map)
        k_tier_map[(((long long)b * num_kv_heads + h) * blocks_per_seq + first + j) * D + i] =
            tier;
    }
  }
  __syncthreads();
  if (counters && warp == 0) {
    int n12 = 0, n16 = 0;
    for (int idx = lane; idx < count * D; idx += 32) {
      const int tr = s_tier[idx / D][idx % D];
      n12 += tr >= 12;
      n16 += tr >= 16;
    }
    n12 = akv_warp_sum_int(n12);
    n16 = akv_warp_sum_int(n16);
    if (lane == 0) {
      atomicAdd(&counters[AKV_K_HI], (unsigned long long)(T * D * count));
      atomicAdd(&counters[AKV_K_MID], (unsigned long long)(T / 2 * n12));
      atomicAdd(&counters[AKV_K_LO], (unsigned long long)(T / 2 * n16));
      atomicAdd(&counters[AKV_METADATA], (unsigned long long)(D * count));
      atomicAdd(&counters[AKV_VALUES],
                (unsigned long long)((min(n, (first + count) * T) - first * T) * D));
    }
  }
}

// Grid (splits, Hk, B), 128 threads; split s covers blocks s*S .. s*S+S-1 of sequence b.
// Lane mapping per block as in version 2.
template <int D, int G, int STAGES>
__device__ __forceinline__ void scores(
    const __half* __restrict__ q, long long q_sb, long long q_sh,
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ k_hi, const uint8_t* __restrict__ k_mid,
    const uint8_t* __restrict__ k_lo, const uint8_t* __restrict__ k_exp, int num_kv_heads,
    float scale, int full_mode, int t8, int t12, int split_blocks,
    float* __restrict__ scores_out, float* __restrict__ block_max,
    float* __restrict__ block_sum, int* __restrict__ block_arg,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ k_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, ROUNDS = D / 32, N = 16 * G, KEEP = N / 8;
  __shared__ float s_q[G][D];
  __shared__ __align__(16) int s_eq[G][D];
  __shared__ __align__(16) uint8_t s_tier[kMaxScoreSplit][D];
  __shared__ int s_phys[kMaxScoreSplit];
  __shared__ float s_part[2][4][4][N];   // two buffers, alternating by block (the epilogue)
  // STAGES > 0: stages of [hi D*T | mid D*T/2 | lo D*T/2] bytes in dynamic shared memory
  constexpr bool STAGED = STAGES > 0;
  constexpr int STAGE = 2 * D * T;

  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  const int nblk = (n + T - 1) / T;
  const int first = blockIdx.x * split_blocks;
  if (first >= nblk) return;
  const int count = min(split_blocks, nblk - first);
  const long long qhead = (long long)b * num_kv_heads * G + (long long)h * G;

  const int tq = lane & 3, cs = lane >> 2;
  Planes<ROUNDS> buf;
  // register path: the planes of block j straight into buf; hi is read at every tier
  auto load_hi = [&](int j) {
    const long long head = (long long)s_phys[j] * num_kv_heads + h;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const long long row = head * D + r * 32 + warp * 8 + cs;
      buf.hi[r] = *reinterpret_cast<const uint4*>(k_hi + row * T + 16 * tq);
    }
  };
  auto load_rest = [&](int j) {
    const long long head = (long long)s_phys[j] * num_kv_heads + h;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int c = r * 32 + warp * 8 + cs;
      const long long row = head * D + c;
      buf.tier[r] = s_tier[j][c];
      buf.mid[r] = make_uint2(0u, 0u);
      buf.lo[r] = make_uint2(0u, 0u);
      if (buf.tier[r] >= 12)
        buf.mid[r] = *reinterpret_cast<const uint2*>(k_mid + row * (T / 2) + 8 * tq);
      if (buf.tier[r] >= 16)
        buf.lo[r] = *reinterpret_cast<const uint2*>(k_lo + row * (T / 2) + 8 * tq);
    }
  };
  score_prologue<D, G, kMaxScoreSplit>(
      b, h, n, first, count, q, q_sb, q_sh, block_table, blocks_per_seq, k_exp, num_kv_heads,
      full_mode, t8, t12, counters, k_tier_map, s_eq, s_tier, s_phys,
      [&](int g, int i, __half qh) { s_q[g][i] = __half2float(qh); },
      [&] {
        if constexpr (!STAGED) load_hi(0);
      });

  // staged path: block j's rows (as its tiers ask) into stage j % 2, then stage -> buf
  auto issue = [&](int j) {
    const long long head = (long long)s_phys[j] * num_kv_heads + h;
    uint8_t* st = akv_dynamic_smem + (j % (STAGED ? STAGES : 1)) * STAGE;
    for (int ch = tid; ch < D * 4; ch += 128) {       // hi: 4 chunks of 16 B per channel
      const int c = ch >> 2, part = ch & 3;
      cp_async16(st + c * T + part * 16, k_hi + (head * D + c) * T + part * 16);
    }
    for (int ch = tid; ch < D * 2; ch += 128) {       // mid, lo: 2 chunks per channel
      const int c = ch >> 1, part = ch & 1, tier = s_tier[j][c];
      if (tier >= 12)
        cp_async16(st + D * T + c * (T / 2) + part * 16,
                   k_mid + (head * D + c) * (T / 2) + part * 16);
      if (tier >= 16)
        cp_async16(st + D * T + D * (T / 2) + c * (T / 2) + part * 16,
                   k_lo + (head * D + c) * (T / 2) + part * 16);
    }
  };
  auto from_stage = [&](int j) {
    const uint8_t* st = akv_dynamic_smem + (j % (STAGED ? STAGES : 1)) * STAGE;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int c = r * 32 + warp * 8 + cs;
      buf.tier[r] = s_tier[j][c];
      buf.hi[r] = *reinterpret_cast<const uint4*>(st + c * T + 16 * tq);
      buf.mid[r] = make_uint2(0u, 0u);
      buf.lo[r] = make_uint2(0u, 0u);
      if (buf.tier[r] >= 12)
        buf.mid[r] = *reinterpret_cast<const uint2*>(st + D * T + c * (T / 2) + 8 * tq);
      if (buf.tier[r] >= 16)
        buf.lo[r] = *reinterpret_cast<const uint2*>(st + D * T + D * (T / 2) + c * (T / 2) + 8 * tq);
    }
  };
  if constexpr (STAGED) {
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
      if (k < count) issue(k);
      cp_async_commit();
    }
  } else {
    load_rest(0);                       // block 0's hi is in flight since the prologue
  }
  for (int j = 0; j < count; ++j) {
    const int blk = first + j;
    if constexpr (STAGED) {
      cp_async_wait<(STAGED ? STAGES - 2 : 0)>();
      __syncthreads();                  // block j landed; stage (j-1) % STAGES is free
      if (j + STAGES - 1 < count) issue(j + STAGES - 1);
      cp_async_commit();
      from_stage(j);
    }
    float acc[N];
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] = 0.f;
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int c = r * 32 + warp * 8 + cs;
      uint2 mid = buf.mid[r], lo = buf.lo[r];
      tier_words(buf.tier[r], mid, lo);
      float kv[16];
      unpack16(buf.hi[r], mid, lo, kv);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float qv = s_q[g][c];
#pragma unroll
        for (int t = 0; t < 16; ++t) acc[g * 16 + t] = fmaf(qv, kv[t], acc[g * 16 + t]);
      }
    }
    if constexpr (!STAGED) {
      if (j + 1 < count) {              // in flight while this block is reduced
        load_hi(j + 1);
        load_rest(j + 1);
      }
    }
    int base = 0;
    rs_step<N, N>(acc, 4, lane, base);
    rs_step<N, N / 2>(acc, 8, lane, base);
    rs_step<N, N / 4>(acc, 16, lane, base);
#pragma unroll
    for (int k = 0; k < KEEP; ++k) s_part[j & 1][warp][tq][base + k] = acc[k];
    __syncthreads();
    const auto& part = s_part[j & 1];
    akv_score_block_epilogue<G>(
        [&](int w, int g, int t) { return part[w][t / 16][g * 16 + t % 16]; }, warp, lane, blk,
        n, scale, scores_out, qhead, (long long)blocks_per_seq * T, blocks_per_seq, block_max,
        block_sum, block_arg);
  }
}

// ------------------------------------------------------------------------------- values
// The values kernels' prologue (versions 3 and 5-7): everything before the plane loads of a
// split of `count` blocks from block `first` of sequence b, KV head h. Fills s_phys
// (physical blocks), s_special (the block holds an exponent maximum of 31), s_tier (each
// token's V tier, 0 = not read) and hands each token's softmax weights p[G] (of the group's
// query heads, fp32, p = exp2((s - m) · log2 e) · (1/l): one division per head, and a
// relative error within about (1.22 |s - m| + 6) · 2^-24 of exp(s - m) / l (the product's
// rounding, log2 e's fp32 rounding, exp2f's 2 ulp, 1/l and the last product), so a tier can
// differ from the reference's only where p lies that close to a power of two, as the GPU
// tests allow) to
// emit(t, tier, special, p) for t in [0, count*T) (special: s_special of its block
// t / T). V tier rule: DESIGN.md section 4, docs/design.md. The global loads
// go out in two dependent rounds, {O_est, block table, scores, softmax statistics} and then
// {V exponent maxima}, so a CTA waits two memory round trips, not three, before its first
// plane load (docs/perf-notes.md); the exponent maxima go to registers of the threads that
// reduce them, with no shared copy. Adds the split's V bytes to `counters`. Ends
// synchronised.
//
// WHOLE (the V-whole path's kernels, akv_decode_values_whole_*; docs/design.md "The V-whole
// path"; a template parameter so that the V rule's kernels keep their code): every token at tier 16
// and no estimate phase before this kernel, so no global statistics and no O_est: m and l
// are this split's own (its blocks' maxima and sums from the scores kernel, merged in block
// order with the estimate kernel's online expressions), p = exp(s - m_split) / l_split, and
// (m_split, l_split) of each head go to split_stats[(qhead + g) * blocks_per_seq + split]
// for akv_decode_combine_rescale. No V exponent maxima are read or counted; every block
// counts as `special` (round 2). full_mode is then ignored.
//
// COHERENT (the split kernel, akv7::split_whole, whose scores and block statistics this CTA
// wrote earlier in the same launch): those are read with ld.global.cg (L2, coherent), never
// through the read-only path that `const __restrict__` allows for data fixed during a launch.
template <int D, int G, int MS, bool WHOLE, bool COHERENT = false, class Emit>
__device__ __forceinline__ void value_prologue(
    int b, int h, int n, int first, int count, const int* __restrict__ block_table,
    int blocks_per_seq, const uint8_t* __restrict__ v_exp, int num_kv_heads, int full_mode,
    int t8, int t12, int skip, int bias, const float* __restrict__ scores_in,
    const float* __restrict__ stats, const float* __restrict__ o_est,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ v_tier_map,
    int (&s_eo)[G][D], int (&s_phys)[MS], int (&s_r)[MS][G],
    int (&s_special)[MS], uint8_t (&s_tier)[MS * AKV_BLOCK_TOKENS], Emit&& emit,
    int split = 0, const float* __restrict__ block_max = nullptr,
    const float* __restrict__ block_sum = nullptr, float* __restrict__ split_stats = nullptr) {
  constexpr int T = AKV_BLOCK_TOKENS, TPT = (MS * T + 127) / 128;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long qhead = ((long long)b * num_kv_heads + h) * G;
  const long long srow = (long long)blocks_per_seq * T;
  // round 1: the split's scores and the group's statistics into registers (used after the
  // second round), O_est exponents and the physical blocks into shared memory
  float sc[TPT][G], mx[G], sum[G];
#pragma unroll
  for (int i = 0; i < TPT; ++i) {
    const int t = tid + 128 * i, tok = first * T + t;
    const bool valid = t < count * T && tok < n;
#pragma unroll
    for (int g = 0; g < G; ++g)
      sc[i][g] = valid ? (COHERENT ? __ldcg(scores_in + (qhead + g) * srow + tok)
                                   : scores_in[(qhead + g) * srow + tok])
                       : 0.f;
  }
  if constexpr (WHOLE) {
    // this split's (m, l) per head from its blocks' statistics, in block order
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float bm[MS], bs[MS];
      const long long row = (qhead + g) * blocks_per_seq + first;
#pragma unroll
      for (int j = 0; j < MS; ++j) {
        bm[j] = j < count ? (COHERENT ? __ldcg(block_max + row + j) : block_max[row + j])
                          : -INFINITY;
        bs[j] = j < count ? (COHERENT ? __ldcg(block_sum + row + j) : block_sum[row + j]) : 0.f;
      }
      float m = -INFINITY, l = 0.f;
#pragma unroll
      for (int j = 0; j < MS; ++j) {
        if (bm[j] == -INFINITY) continue;
        if (bm[j] > m) {
          l = l * expf(m - bm[j]) + bs[j];     // m = -inf at first: 0 * 0
          m = bm[j];
        } else {
          l += bs[j] * expf(bm[j] - m);
        }
      }
      mx[g] = m;
      sum[g] = l;
      if (tid == g) {
        split_stats[((qhead + g) * blocks_per_seq + split) * 2] = m;
        split_stats[((qhead + g) * blocks_per_seq + split) * 2 + 1] = l;
      }
    }
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      mx[g] = stats[(qhead + g) * 2];
      sum[g] = stats[(qhead + g) * 2 + 1];
    }
#pragma unroll
    for (int k = 0; k < (G * D + 127) / 128; ++k) {     // a compile-time trip count
      const int idx = tid + 128 * k, g = idx / D, d = idx % D;
      if (idx < G * D) s_eo[g][d] = akv_unbiased_exp32(o_est[(qhead + g) * D + d]);
    }
  }
  if (tid < count) s_phys[tid] = block_table[(long long)b * blocks_per_seq + first + tid];
  __syncthreads();
  {
    // round 2: the V exponent maxima, 16 threads per block j of the split (tid = 16 j +
    // slice), D/16 consecutive channels each in one load, straight into registers; then
    // r[j][g] = min_d (E(O_est[g][d]) - (max(ev[j][d], 1) - 15)) + bias, the min over the
    // 16 (lanes that differ in bits 0-3: every lane takes part in the shuffles)
    constexpr int DS = D / 16;
    static_assert(MS * 16 == 128, "16 threads per block of the split");
    static_assert(DS == 4 || DS == 8, "head_dim 64 or 128");
    const int j = tid >> 4, d0 = (tid & 15) * DS;
    uint32_t w[DS / 4];
#pragma unroll
    for (int k = 0; k < DS / 4; ++k) w[k] = 0x01010101u;
    if (!WHOLE && j < count) {
      const uint8_t* src = v_exp + ((long long)s_phys[j] * num_kv_heads + h) * D + d0;
      if constexpr (DS == 8) {
        const uint2 x = *reinterpret_cast<const uint2*>(src);
        w[0] = x.x;
        w[DS / 4 - 1] = x.y;
      } else {
        w[0] = *reinterpret_cast<const uint32_t*>(src);
      }
    }
    int ev[DS], special = 0;
#pragma unroll
    for (int k = 0; k < DS; ++k) {
      const int e = (w[k / 4] >> (8 * (k % 4))) & 0xFF;
      special |= e == AKV_SPECIAL_EXPONENT;
      ev[k] = max(e, 1);
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) special |= __shfl_xor_sync(0xffffffffu, special, o);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      int r = 0x7fffffff;
#pragma unroll
      for (int k = 0; k < DS; ++k) r = min(r, WHOLE ? 0 : s_eo[g][d0 + k] - ev[k]);
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) r = min(r, __shfl_xor_sync(0xffffffffu, r, o));
      if ((tid & 15) == 0 && j < count) s_r[j][g] = r + 15 + bias;
    }
    // WHOLE: no exponent maxima are read; every block counts as special, which only the
    // tensor-core kernels use: a positive weight whose two fp16 columns round to 0 keeps the
    // smallest subnormal, so a +Inf in V stays +Inf (for finite V it adds at most 2^-34 of
    // |v| per token: far below the fp16 output's rounding)
    if ((tid & 15) == 0 && j < count) s_special[j] = WHOLE ? 1 : special;
  }
  __syncthreads();
  const int skip_at = skip + akv_skip_budget(n);
  float inv[G];                        // 1 / l: one division per head, not per token
#pragma unroll
  for (int g = 0; g < G; ++g) inv[g] = 1.f / sum[g];
#pragma unroll
  for (int i = 0; i < TPT; ++i) {
    const int t = tid + 128 * i;
    if (t >= count * T) break;
    const int j = t / T, tok = first * T + t;
    const bool valid = tok < n, special = s_special[j];
    float p[G];
    int gap = 0x7fffffff;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      // computed for every token (a masked one's score reads as 0), then selected: no branch
      const float e = exp2f((sc[i][g] - mx[g]) * 1.44269504f) * inv[g];
      // WHOLE: a split whose scores are all -inf (m_split = -inf, l_split = 0) weighs 0
      // here (not NaN) and 0 in the combine, as in fp16 attention
      p[g] = valid && (!WHOLE || mx[g] != -INFINITY) ? e : 0.f;
      gap = min(gap, s_r[j][g] - akv_unbiased_exp32(p[g]));
    }
    // the group's tier is the highest of its heads' tiers; the tier falls as the gap grows
    // (t8 >= t12, and every gap >= skip gives 0), so it is the tier of the smallest gap
    int tier = akv_v_tier_from_gap(gap, skip_at, t8, t12);
    if (WHOLE || full_mode || special) tier = 16;
    if (!valid) tier = 0;
    s_tier[t] = tier;
    if (v_tier_map && valid)
      v_tier_map[((long long)b * num_kv_heads + h) * srow + tok] = tier;
    emit(t, tier, special, p);
  }
  __syncthreads();
  if (counters && warp == 0) {
    int n8 = 0, n12 = 0, n16 = 0;
    for (int t = lane; t < count * T; t += 32) {
      const int tr = s_tier[t];
      n8 += tr > 0;
      n12 += tr >= 12;
      n16 += tr >= 16;
    }
    n8 = akv_warp_sum_int(n8);
    n12 = akv_warp_sum_int(n12);
    n16 = akv_warp_sum_int(n16);
    if (lane == 0) {
      atomicAdd(&counters[AKV_V_HI], (unsigned long long)(n8 * D));
      atomicAdd(&counters[AKV_V_MID], (unsigned long long)(n12 * D / 2));
      atomicAdd(&counters[AKV_V_LO], (unsigned long long)(n16 * D / 2));
      if (!WHOLE) atomicAdd(&counters[AKV_METADATA], (unsigned long long)(D * count));
    }
  }
}

template <int D, int G, int STAGES, bool WHOLE = false>
__device__ __forceinline__ void values(
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ v_hi, const uint8_t* __restrict__ v_mid,
    const uint8_t* __restrict__ v_lo, const uint8_t* __restrict__ v_exp, int num_kv_heads,
    int full_mode, int t8, int t12, int skip, int bias, int split_blocks,
    const float* __restrict__ scores_in, const float* __restrict__ stats,
    const float* __restrict__ o_est, float* __restrict__ partial,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ v_tier_map,
    const float* __restrict__ block_max = nullptr, const float* __restrict__ block_sum = nullptr,
    float* __restrict__ split_stats = nullptr) {
  constexpr int T = AKV_BLOCK_TOKENS, SLICES = D / 16, TPW = 32 / SLICES;
  constexpr int ROUNDS = T / (4 * TPW), N = 16 * G;
  constexpr int STEPS = TPW == 4 ? 2 : 3;
  constexpr int KEEP = N >> STEPS;
  __shared__ __align__(16) int s_eo[G][D];
  __shared__ int s_phys[kMaxSplit];
  __shared__ int s_r[kMaxSplit][G];
  __shared__ int s_special[kMaxSplit];
  __shared__ float s_p[G][kMaxSplit * T];
  __shared__ uint8_t s_tier[kMaxSplit * T];
  // STAGES > 0: stages of [hi T*D | mid T*D/2 | lo T*D/2] bytes in dynamic shared memory,
  // reused by the final reduction (which needs PART bytes; the host sizes the dynamic
  // memory as max(STAGES * STAGE, PART)). Otherwise a static array for the reduction.
  constexpr bool STAGED = STAGES > 0;
  constexpr int STAGE = 2 * T * D, PART = 4 * SLICES * N * 4;
  __shared__ __align__(16) uint8_t s_static[STAGED ? 16 : PART];
  uint8_t* s_mem = STAGED ? akv_dynamic_smem : s_static;
  auto s_part = reinterpret_cast<float(*)[SLICES][N]>(s_mem);

  const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  const int nblk = (n + T - 1) / T;
  const int first = split * split_blocks;
  if (first >= nblk) return;
  const int count = min(split_blocks, nblk - first);
  const int num_q_heads = num_kv_heads * G;
  const long long qhead = (long long)b * num_q_heads + (long long)h * G;
  value_prologue<D, G, kMaxSplit, WHOLE>(
      b, h, n, first, count, block_table, blocks_per_seq, v_exp, num_kv_heads, full_mode, t8,
      t12, skip, bias, scores_in, stats, o_est, counters, v_tier_map, s_eo, s_phys,
      s_r, s_special, s_tier, [&](int t, int, bool, const float* p) {
#pragma unroll
        for (int g = 0; g < G; ++g) s_p[g][t] = p[g];
      }, split, block_max, block_sum, split_stats);

  const int cs = lane % SLICES, tw = lane / SLICES;
  auto load = [&](Planes<ROUNDS>& p, int j) {
    const long long head = (long long)s_phys[j] * num_kv_heads + h;
    const uint8_t* vhi = v_hi + head * T * D;
    const uint8_t* vmid = v_mid + head * T * (D / 2);
    const uint8_t* vlo = v_lo + head * T * (D / 2);
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int t = r * 4 * TPW + warp * TPW + tw;
      p.tier[r] = s_tier[j * T + t];
      p.hi[r] = make_uint4(0u, 0u, 0u, 0u);
      p.mid[r] = make_uint2(0u, 0u);
      p.lo[r] = make_uint2(0u, 0u);
      if (p.tier[r] > 0) p.hi[r] = *reinterpret_cast<const uint4*>(vhi + t * D + 16 * cs);
      if (p.tier[r] >= 12)
        p.mid[r] = *reinterpret_cast<const uint2*>(vmid + t * (D / 2) + 8 * cs);
      if (p.tier[r] >= 16)
        p.lo[r] = *reinterpret_cast<const uint2*>(vlo + t * (D / 2) + 8 * cs);
    }
  };
  float acc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = 0.f;
  auto accumulate = [&](Planes<ROUNDS>& p, int j) {
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      if (p.tier[r] == 0) continue;
      const int t = j * T + r * 4 * TPW + warp * TPW + tw;
      uint2 mid = p.mid[r], lo = p.lo[r];
      tier_words(p.tier[r], mid, lo);
      float vv[16];
      unpack16(p.hi[r], mid, lo, vv);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float w = s_p[g][t];
#pragma unroll
        for (int k = 0; k < 16; ++k) acc[g * 16 + k] = fmaf(w, vv[k], acc[g * 16 + k]);
      }
    }
  };
  if constexpr (STAGED) {
    auto issue = [&](int j) {
      const long long head = (long long)s_phys[j] * num_kv_heads + h;
      uint8_t* st = s_mem + (j % (STAGED ? STAGES : 1)) * STAGE;
      for (int ch = tid; ch < T * D / 16; ch += 128) {     // hi: D/16 chunks per token
        const int t = ch / (D / 16), part = ch % (D / 16);
        if (s_tier[j * T + t] > 0)
          cp_async16(st + t * D + part * 16, v_hi + (head * T + t) * D + part * 16);
      }
      for (int ch = tid; ch < T * D / 32; ch += 128) {     // mid, lo: D/32 chunks per token
        const int t = ch / (D / 32), part = ch % (D / 32), tier = s_tier[j * T + t];
        if (tier >= 12)
          cp_async16(st + T * D + t * (D / 2) + part * 16,
                     v_mid + (head * T + t) * (D / 2) + part * 16);
        if (tier >= 16)
          cp_async16(st + T * D + T * (D / 2) + t * (D / 2) + part * 16,
                     v_lo + (head * T + t) * (D / 2) + part * 16);
      }
    };
    Planes<ROUNDS> a;
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
      if (k < count) issue(k);
      cp_async_commit();
    }
    for (int j = 0; j < count; ++j) {
      cp_async_wait<(STAGED ? STAGES - 2 : 0)>();
      __syncthreads();                  // block j landed; stage (j-1) % STAGES is free
      if (j + STAGES - 1 < count) issue(j + STAGES - 1);
      cp_async_commit();
      const uint8_t* st = s_mem + (j % (STAGED ? STAGES : 1)) * STAGE;
#pragma unroll
      for (int r = 0; r < ROUNDS; ++r) {
        const int t = r * 4 * TPW + warp * TPW + tw;
        a.tier[r] = s_tier[j * T + t];
        a.hi[r] = *reinterpret_cast<const uint4*>(st + t * D + 16 * cs);
        a.mid[r] = make_uint2(0u, 0u);
        a.lo[r] = make_uint2(0u, 0u);
        if (a.tier[r] >= 12)
          a.mid[r] = *reinterpret_cast<const uint2*>(st + T * D + t * (D / 2) + 8 * cs);
        if (a.tier[r] >= 16)
          a.lo[r] = *reinterpret_cast<const uint2*>(st + T * D + T * (D / 2) + t * (D / 2) + 8 * cs);
      }
      accumulate(a, j);
    }
    cp_async_wait<0>();
    __syncthreads();                    // the stages become the reduction buffer
  } else {
    // one register buffer: fewer registers, more CTAs per SM (the V phase is latency-bound,
    // docs/perf-notes.md)
    Planes<ROUNDS> a;
    for (int j = 0; j < count; ++j) {
      load(a, j);
      accumulate(a, j);
    }
  }
  int base = 0;
  if (STEPS == 3) {
    rs_step<N, N>(acc, 4, lane, base);
    rs_step<N, N / 2>(acc, 8, lane, base);
    rs_step<N, N / 4>(acc, 16, lane, base);
  } else {
    rs_step<N, N>(acc, 8, lane, base);
    rs_step<N, N / 2>(acc, 16, lane, base);
  }
#pragma unroll
  for (int k = 0; k < KEEP; ++k) s_part[warp][cs][base + k] = acc[k];
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += 128) {
    const int g = idx / D, d = idx % D;
    const int slice = d / 16, v = g * 16 + d % 16;
    const float o = ((s_part[0][slice][v] + s_part[1][slice][v]) + s_part[2][slice][v]) +
                    s_part[3][slice][v];
    partial[((qhead + g) * blocks_per_seq + split) * D + d] = o;
  }
}

}  // namespace akv3

// Entry points of the split kernels (versions 3-8): one signature for every version's scores
// kernel and one for its values kernel. FN is the device function, parenthesised (its
// template arguments hold commas); the rest are __launch_bounds__' arguments (128 threads, and
// the minimum CTAs per SM where a version caps its registers; `128, 1` is not the same as
// `128`: ptxas then picks other register counts).
#define AKV_SPLIT_SCORES_ENTRY(NAME, FN, ...)                                                \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(                              \
      const __half* q, long long q_sb, long long q_sh, const int* lengths,                   \
      const int* block_table, int blocks_per_seq, const uint8_t* k_hi, const uint8_t* k_mid, \
      const uint8_t* k_lo, const uint8_t* k_exp, int num_kv_heads, int group, float scale,   \
      int full_mode, int t8, int t12, int split_blocks, float* scores, float* block_max,     \
      float* block_sum, int* block_arg, unsigned long long* counters, uint8_t* k_tier_map) { \
    FN(q, q_sb, q_sh, lengths, block_table, blocks_per_seq, k_hi, k_mid, k_lo, k_exp,        \
       num_kv_heads, scale, full_mode, t8, t12, split_blocks, scores, block_max, block_sum,  \
       block_arg, counters, k_tier_map);                                                     \
  }
#define AKV_SPLIT_VALUES_ENTRY(NAME, FN, ...)                                                \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(                              \
      const int* lengths, const int* block_table, int blocks_per_seq, const uint8_t* v_hi,   \
      const uint8_t* v_mid, const uint8_t* v_lo, const uint8_t* v_exp, int num_kv_heads,     \
      int group, int full_mode, int t8, int t12, int skip, int bias, int split_blocks,       \
      const float* scores, const float* stats, const float* o_est, float* partial,           \
      unsigned long long* counters, uint8_t* v_tier_map) {                                   \
    FN(lengths, block_table, blocks_per_seq, v_hi, v_mid, v_lo, v_exp, num_kv_heads,         \
       full_mode, t8, t12, skip, bias, split_blocks, scores, stats, o_est, partial, counters, \
       v_tier_map);                                                                          \
  }
// The V-whole path's values kernels (akv_decode_values_whole_*): the same parameters and the
// block statistics in, split_stats out.
#define AKV_SPLIT_VALUES_WHOLE_ENTRY(NAME, FN, ...)                                          \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(                              \
      const int* lengths, const int* block_table, int blocks_per_seq, const uint8_t* v_hi,   \
      const uint8_t* v_mid, const uint8_t* v_lo, const uint8_t* v_exp, int num_kv_heads,     \
      int group, int full_mode, int t8, int t12, int skip, int bias, int split_blocks,       \
      const float* scores, const float* stats, const float* o_est, float* partial,           \
      unsigned long long* counters, uint8_t* v_tier_map, const float* block_max,             \
      const float* block_sum, float* split_stats) {                                          \
    FN(lengths, block_table, blocks_per_seq, v_hi, v_mid, v_lo, v_exp, num_kv_heads,         \
       full_mode, t8, t12, skip, bias, split_blocks, scores, stats, o_est, partial, counters, \
       v_tier_map, block_max, block_sum, split_stats);                                       \
  }

// Minimum CTAs per SM of version 3's register-path scores kernel (akv3::scores without
// stages: versions 3, 5 and 6): 6 at head_dim 128, group 1 (MHA), where it would otherwise
// take 96 registers and run 5 CTAs per SM, 7 % slower (docs/perf-notes.md, sixth session);
// at group 2 the occupancy it had before the seventh session's prologue (5 CTAs at head_dim
// 128, 7 at 64: 96 and 72 registers, which ptxas would otherwise raise to 128 and 79; at 64
// it then spills one 64-bit value, 8 bytes stored, reloaded in the block loop; not timed:
// versions 3, 5 and 6 are not the default at group 2);
// elsewhere 0, which ptxas treats as no minimum (the same SASS as `__launch_bounds__(128)`).
#define AKV3_SCORE_MINB(STAGES, D, G)                                                        \
  (STAGES != 0 ? 0                                                                           \
   : D == 128 ? (G == 1 ? 6 : G == 2 ? 5 : 0)                                                \
              : (G == 2 ? 7 : 0))

// Minimum CTAs per SM of version 3's register-path values kernel at MHA: 8 at head_dim 128
// and 10 at 64, the occupancy its registers (64 and 48) gave before the prologue of the
// seventh session, whose code ptxas would otherwise give 67 and 53 registers (7 and 9
// CTAs per SM); elsewhere no minimum.
#define AKV3_VALUE_MINB(STAGES, D, G) \
  (STAGES == 0 && G == 1 ? (D == 128 ? 8 : AKV_MINB_FIT(10)) : 0)

#define AKV3_ENTRIES(V, SCORE_STAGES, VALUE_STAGES, D, G)                                    \
  AKV_SPLIT_SCORES_ENTRY(akv_decode_scores_v##V##_d##D##_g##G,                               \
                         (akv3::scores<D, G, SCORE_STAGES>), 128,                            \
                         AKV3_SCORE_MINB(SCORE_STAGES, D, G))                                \
  AKV_SPLIT_VALUES_ENTRY(akv_decode_values_v##V##_d##D##_g##G,                               \
                         (akv3::values<D, G, VALUE_STAGES>), 128,                            \
                         AKV3_VALUE_MINB(VALUE_STAGES, D, G))                                \
  AKV_SPLIT_VALUES_WHOLE_ENTRY(akv_decode_values_whole_v##V##_d##D##_g##G,                   \
                               (akv3::values<D, G, VALUE_STAGES, true>), 128,                \
                               AKV3_VALUE_MINB(VALUE_STAGES, D, G))
