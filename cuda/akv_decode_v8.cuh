// Decode kernels, version 8: version 7's tensor-core scores with one warp per 64-token block
// (the values kernel is version 7's, so version 8 launches akv_decode_values_v7_*).
//
// Version 7's scores kernel splits each block's channels over its four warps: every block
// ends in partial sums through shared memory, a CTA barrier and a reduction of the four
// quarters by one warp per head (akv_score_block_epilogue). Here each warp owns whole blocks
// (blocks warp, warp + 4, ... of the CTA's split) and runs all D / 16 k-steps of a block
// itself, so the mma's fp32 accumulators already hold the block's finished dot products:
// no partial sums, no barrier in the main loop, and the block statistics come from the
// accumulators with three shuffles per reduction (the eight lanes of one head).
//
// Fragment mapping as version 7 (PTX ISA, m16n8k16 .f16; lane = 4*g8 + tq), with the
// warp's channel quarter widened to all channels:
//   m-tile mt, row g8 -> token 8g8 + 2mt, row g8+8 -> token 8g8 + 2mt + 1 (a lane's rows are
//     tokens 8g8 .. 8g8+7: one 8-byte hi load per channel row);
//   k-step ks, k 2tq, 2tq+1, 2tq+8, 2tq+9 -> channels 16ks + 4tq + {0, 1, 2, 3};
//   C's c0, c1 = heads 2tq, 2tq+1 of token 8g8+2mt; c2, c3 = the same of token 8g8+2mt+1.
// A lane's planes of one k-step (an "item": 4 hi rows of 8 bytes, 4 mid and 4 lo words) are
// loaded two items ahead through a ring of two register sets; the last two items of a block
// fetch the first two of the warp's next block, so they are in flight during the epilogue.
// Tiers, counters and the A fragments (akv7::kstep_mma) as version 7; the scores differ in
// fp32 summation order (one accumulator chain over all channels instead of four quarter
// sums), and so does each block's sum of exponentials (8 terms per lane, then three
// shuffles, against version 7's two per lane and five shuffles).
// Measured (H200, docs/perf-notes.md, eleventh session): 2 % faster than version 7 at head
// dim 64 (SmolLM2, batch 8 and 32 at 16k; equal at 32 x 4k), 2-3 % slower at head_dim 128
// and 16 % at Llama-3-8B 1 x 4k, where a warp's eight dependent item steps per block (and
// a quarter of version 7's CTAs in one wave) replace version 7's one round trip per CTA;
// the host ran it by default at head_dim 64 then. Both kernels are bound by load latency
// (Nsight Compute: long-scoreboard stalls, DRAM at 62 % of peak at Llama-3-8B 8 x 16k);
// more bytes in flight through shared memory (cp.async, a ring of 4-8 items per warp), an
// L2 bulk prefetch of the next block, and (twelfth session) whole blocks brought into
// shared memory by bulk copies (cp.async.bulk, 0.182 against 0.159 ms) were slower. Since
// the twelfth session's akv7::kstep_mma, version 7 is ahead or equal at head_dim 64 as
// well, and the host no longer runs this version by default (kernels.default_decode_version).
#pragma once
#include <utility>
#include "akv_decode_v7.cuh"

namespace akv8 {

using akv3::kMaxScoreSplit;
using akv5::mma16816;

// Call f(std::integral_constant<int, I>) for I = 0 .. N-1 (a compile-time loop: the plane
// loads take their row offsets as PTX immediates).
template <class F, int... I>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// One lane's planes of one k-step of one block.
struct Item {
  uint2 hi[4];
  uint32_t mid[4], lo[4];
};

// A finished block's epilogue, from the accumulators of its warp: head 2tq + e, tokens
// 8g8 .. 8g8+7 of this lane (the eight lanes g8 of one tq hold a head's 64 scores). Scales,
// stores the valid scores and writes the block's max, first arg-max and sum of exp(s - max)
// (akv_block_stats2's quantities, reference.decode_attention's bmax, barg, bsum).
template <int G>
__device__ __forceinline__ void block_epilogue(const float (&acc)[4][4], int lane, int blk,
                                               int n, float scale, float* scores_out,
                                               long long qhead, long long srow,
                                               int blocks_per_seq, float* block_max,
                                               float* block_sum, int* block_arg) {
  constexpr int T = AKV_BLOCK_TOKENS;
  const int g8 = lane >> 2, tq = lane & 3;
  const int t0 = blk * T + 8 * g8;
#pragma unroll
  for (int e = 0; e < (G > 1 ? 2 : 1); ++e) {
    const int g = 2 * tq + e;
    const bool head_ok = G >= 8 || g < G;
    float s[8];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      s[2 * mt] = acc[mt][e] * scale;
      s[2 * mt + 1] = acc[mt][2 + e] * scale;
    }
    float* dst = scores_out + (qhead + min(g, G - 1)) * srow + t0;
    if (t0 + 8 <= n) {
      if (head_ok) {
        reinterpret_cast<float4*>(dst)[0] = make_float4(s[0], s[1], s[2], s[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(s[4], s[5], s[6], s[7]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const bool valid = t0 + k < n;
        if (valid && head_ok) dst[k] = s[k];
        s[k] = valid ? s[k] : -INFINITY;
      }
    }
    float m = s[0];
#pragma unroll
    for (int k = 1; k < 8; ++k) m = fmaxf(m, s[k]);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    int arg = T;
#pragma unroll
    for (int k = 7; k >= 0; --k) arg = s[k] == m ? 8 * g8 + k : arg;
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) arg = min(arg, __shfl_xor_sync(0xffffffffu, arg, o));
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) sum += s[k] == -INFINITY ? 0.f : expf(s[k] - m);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (g8 == 0 && head_ok) {
      const long long at = (qhead + g) * blocks_per_seq + blk;
      block_max[at] = m;
      block_sum[at] = sum;
      block_arg[at] = blk * T + (arg < T ? arg : 0);
    }
  }
}

// B fragments (qᵀ) of every k-step into s_bq[ks][lane]: head g8 (zero past G), channels
// 16ks + 4tq + {0, 1} (x) and {2, 3} (y). The caller synchronises.
template <int D, int G>
__device__ __forceinline__ void stage_bq(const __half (&s_qh)[G][D], uint2 (&s_bq)[D / 16][32]) {
  for (int idx = threadIdx.x; idx < (D / 16) * 32; idx += blockDim.x) {
    const int ks = idx >> 5, g = (idx & 31) >> 2, c = 16 * ks + 4 * (idx & 3);
    uint2 v = make_uint2(0u, 0u);
    if (g < G) {
      v.x = (uint32_t)__half_as_ushort(s_qh[g][c]) |
            ((uint32_t)__half_as_ushort(s_qh[g][c + 1]) << 16);
      v.y = (uint32_t)__half_as_ushort(s_qh[g][c + 2]) |
            ((uint32_t)__half_as_ushort(s_qh[g][c + 3]) << 16);
    }
    s_bq[ks][idx & 31] = v;
  }
}

template <int D, int G>
__device__ __forceinline__ void scores(
    const __half* __restrict__ q, long long q_sb, long long q_sh,
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ k_hi, const uint8_t* __restrict__ k_mid,
    const uint8_t* __restrict__ k_lo, const uint8_t* __restrict__ k_exp, int num_kv_heads,
    float scale, int full_mode, int t8, int t12, int split_blocks,
    float* __restrict__ scores_out, float* __restrict__ block_max,
    float* __restrict__ block_sum, int* __restrict__ block_arg,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ k_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, HALF = T / 2, KS = D / 16;   // k-steps per block
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(G >= 1 && G <= 8, "at most 8 query heads per KV head");
  static_assert(KS % 2 == 0, "the two-item ring needs an even number of k-steps");
  __shared__ __half s_qh[G][D];
  __shared__ __align__(16) int s_eq[G][D];
  __shared__ __align__(16) uint8_t s_tier[kMaxScoreSplit][D];
  __shared__ int s_phys[kMaxScoreSplit];
  __shared__ uint2 s_bq[KS][32];      // B fragments (qᵀ) of each k-step, by lane

  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  const int nblk = (n + T - 1) / T;
  const int first = blockIdx.x * split_blocks;
  if (first >= nblk) return;
  const int count = min(split_blocks, nblk - first);
  const long long qhead = (long long)b * num_kv_heads * G + (long long)h * G;
  const int g8 = lane >> 2, tq = lane & 3;
  // a lane's byte offsets inside a block's planes (channel 4tq + 16ks + i adds a constant)
  const int hi_lane = 4 * tq * T + 8 * g8, ml_lane = 4 * tq * HALF + 4 * g8;
  const int mine = warp < count ? (count - warp + 3) / 4 : 0;   // blocks of this warp

  auto head_of = [&](int j) { return (long long)s_phys[j] * num_kv_heads + h; };
  auto load_hi = [&](Item& it, int j, auto ksc) {
    constexpr int ks = decltype(ksc)::value;
    const uint8_t* p = k_hi + head_of(j) * (D * T) + hi_lane;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      it.hi[i] = *reinterpret_cast<const uint2*>(p + (16 * ks + i) * T);
  };
  auto load_rest = [&](Item& it, int j, auto ksc) {
    constexpr int ks = decltype(ksc)::value;
    const long long off = head_of(j) * (D * HALF) + ml_lane;
    akv7::rest_of_kstep<ks>(&s_tier[j][4 * tq], k_mid + off, k_lo + off, it.mid, it.lo);
  };
  Item ring[2];
  akv3::score_prologue<D, G, kMaxScoreSplit>(
      b, h, n, first, count, q, q_sb, q_sh, block_table, blocks_per_seq, k_exp, num_kv_heads,
      full_mode, t8, t12, counters, k_tier_map, s_eq, s_tier, s_phys,
      [&](int g, int i, __half qh) { s_qh[g][i] = qh; },
      [&] {                             // the hi rows are read at every tier: issue them now
        if (mine > 0) {
          load_hi(ring[0], warp, std::integral_constant<int, 0>{});
          load_hi(ring[1], warp, std::integral_constant<int, 1>{});
        }
      });
  stage_bq<D, G>(s_qh, s_bq);
  if (mine > 0) {
    load_rest(ring[0], warp, std::integral_constant<int, 0>{});
    load_rest(ring[1], warp, std::integral_constant<int, 1>{});
  }
  __syncthreads();                     // s_bq
  const long long srow = (long long)blocks_per_seq * T;

  for (int jj = 0; jj < mine; ++jj) {
    const int j = warp + 4 * jj, blk = first + j;
    const bool more = jj + 1 < mine;
    float acc[4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[mt][k] = 0.f;
    static_for<KS>([&](auto ksc) {
      constexpr int ks = decltype(ksc)::value;
      Item& it = ring[ks % 2];
      const uint2 bq = s_bq[ks][lane];
      akv7::kstep_mma(acc, it.hi, it.mid, it.lo, bq.x, bq.y);
      // the ring slot is free: the item two k-steps on (of this block or of the next),
      // issued after the mma so that the assembled words are dead (fewer live registers)
      if constexpr (ks + 2 < KS) {
        load_hi(it, j, std::integral_constant<int, ks + 2>{});
        load_rest(it, j, std::integral_constant<int, ks + 2>{});
      } else if (more) {
        load_hi(it, j + 4, std::integral_constant<int, ks + 2 - KS>{});
        load_rest(it, j + 4, std::integral_constant<int, ks + 2 - KS>{});
      }
    });
    block_epilogue<G>(acc, lane, blk, n, scale, scores_out, qhead, srow, blocks_per_seq,
                      block_max, block_sum, block_arg);
  }
}


}  // namespace akv8

// Version 8's scores kernel: at least 6 CTAs per SM (80 registers) at every shape; at 9
// (version 7's choice at head_dim 64, groups up to 3) its two-item ring spills ~300 bytes.
// At 80 registers ptxas still spills a little at some shapes (nvcc 13.0, sm_90, with the
// twelfth session's akv7::kstep_mma over akv_pair_frags: bytes stored / loaded 12 / 20 at
// head_dim 64 group 1, 24 / 32 at 64 group 3, 12 / 12 at 128 group 1, 4 / 8 at 128 groups
// 4-6; none elsewhere).
#ifndef AKV8_SCORE_MINB
#define AKV8_SCORE_MINB 6
#endif
#define AKV8_ENTRIES(D, G)                                                                   \
  AKV_SPLIT_SCORES_ENTRY(akv_decode_scores_v8_d##D##_g##G, (akv8::scores<D, G>), 128,        \
                         AKV8_SCORE_MINB)
