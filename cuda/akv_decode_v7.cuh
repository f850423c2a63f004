// Decode kernels, version 7: q·Kᵀ on tensor cores as well (the values kernel is version 6's).
//
// Version 3's scores kernel does G FMAs per K value read (G = query heads per KV head) and
// holds 16·G accumulators per lane: at G = 4 it uses 128 registers and is bound by its FMAs
// (docs/perf-notes.md). Here one `mma.sync.m16n8k16` per 16 tokens × 16 channels computes the
// dot products of all G ≤ 8 heads at once (fp16 K and q are exact operands; fp32
// accumulation), so the per-value work is the fp16 assembly alone.
//
// The product is s[64 tokens, G] = K[64, D] · qᵀ[D, G]; A = K (rows = tokens, k = channels),
// B = qᵀ (k = channels, columns = heads; columns ≥ G are zero). Fragment mapping
// (PTX ISA, m16n8k16 .f16, lane = 4*g + tq; see akv_decode_v5.cuh for the layout):
//   m-tile mt, row g -> token 8g + 2mt, row g+8 -> token 8g + 2mt + 1: a lane's rows are the
//     8 consecutive tokens 8g .. 8g+7, one 8-byte hi load per channel row;
//   k-step ks of warp w, k 2tq, 2tq+1, 2tq+8, 2tq+9 -> channels c0..c3 = w*D/4 + 16ks + 4tq +
//     {0, 1, 2, 3}: a lane's four channels of each k-step;
//   so a0 = (token 8g+2mt; c0, c1), a1 = (token 8g+2mt+1; c0, c1), a2/a3 the same for c2, c3,
//   and C's c0, c1 = heads 2tq, 2tq+1 of token 8g+2mt, c2, c3 = the same of token 8g+2mt+1.
// Each warp sums its quarter of the channels; the four partial sums meet in shared memory (in
// a fixed order). Tiers, counters, block statistics and outputs as version 3 (the scores
// differ in fp32 summation order).
#pragma once
#include "akv_decode_v5.cuh"

namespace akv7 {

using akv3::kMaxScoreSplit;
using akv5::mma16816;

// A lane's mid/lo words of k-step KS of one block: channels tiers[16 KS + i] (i < 4, one
// 4-byte shared load of their tiers), rows 16 KS + i of the block's planes at pm / pl.
// A plane the tier leaves unread gets its refill here, as the load's default (tier 8: mid
// 0x8..., lo 0; tier 12: lo 0x8...: akv2::tier_words' words), so the words need no select
// by tier where they are assembled (twelfth session: ~2 integer instructions per channel
// row fewer in the main loop).
template <int KS>
__device__ __forceinline__ void rest_of_kstep(const uint8_t* tiers, const uint8_t* pm,
                                              const uint8_t* pl, uint32_t (&mid)[4],
                                              uint32_t (&lo)[4]) {
  constexpr int HALF = AKV_BLOCK_TOKENS / 2;                 // bytes per mid/lo row
  constexpr uint32_t R = 0x88888888u;                        // the midpoint refill
  const uint32_t t4 = *reinterpret_cast<const uint32_t*>(tiers + 16 * KS);
  const bool m0 = (t4 & 0xFF) >= 12, m1 = ((t4 >> 8) & 0xFF) >= 12,
             m2 = ((t4 >> 16) & 0xFF) >= 12, m3 = (t4 >> 24) >= 12;
  mid[0] = akv_load_u32_if<(16 * KS + 0) * HALF>(pm, m0, R);
  mid[1] = akv_load_u32_if<(16 * KS + 1) * HALF>(pm, m1, R);
  mid[2] = akv_load_u32_if<(16 * KS + 2) * HALF>(pm, m2, R);
  mid[3] = akv_load_u32_if<(16 * KS + 3) * HALF>(pm, m3, R);
  lo[0] = akv_load_u32_if<(16 * KS + 0) * HALF>(pl, (t4 & 0xFF) >= 16, m0 ? R : 0u);
  lo[1] = akv_load_u32_if<(16 * KS + 1) * HALF>(pl, ((t4 >> 8) & 0xFF) >= 16, m1 ? R : 0u);
  lo[2] = akv_load_u32_if<(16 * KS + 2) * HALF>(pl, ((t4 >> 16) & 0xFF) >= 16, m2 ? R : 0u);
  lo[3] = akv_load_u32_if<(16 * KS + 3) * HALF>(pl, (t4 >> 24) >= 16, m3 ? R : 0u);
}

// One k-step of s[64 tokens, 8 heads] += K · qᵀ from a lane's 4 channel rows (hi: 8
// tokens' high bytes; mid, lo: their nibbles, already holding their tier's refill) and the
// k-step's B fragment (b0, b1). The A fragments come straight from the planes
// (akv_pair_frags over the channel pairs (c0, c1) and (c2, c3); twelfth session, in place
// of assemble8's half2 words and a transpose). Registers as the mapping above: a0 = (token
// 8g+2mt; c0, c1), a1 = (token 8g+2mt+1; c0, c1), a2, a3 the same for c2, c3.
__device__ __forceinline__ void kstep_mma(float (&acc)[4][4], const uint2 (&hi)[4],
                                          const uint32_t (&mid)[4], const uint32_t (&lo)[4],
                                          uint32_t b0, uint32_t b1) {
  uint32_t e01[4], o01[4], e23[4], o23[4];   // [m-tile]: tokens 8g+2mt (e), 8g+2mt+1 (o)
  akv_pair_frags(hi[0].x, hi[0].y, mid[0], lo[0], hi[1].x, hi[1].y, mid[1], lo[1], e01, o01);
  akv_pair_frags(hi[2].x, hi[2].y, mid[2], lo[2], hi[3].x, hi[3].y, mid[3], lo[3], e23, o23);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) mma16816(acc[mt], e01[mt], o01[mt], e23[mt], o23[mt], b0, b1);
}

// The B fragments (qᵀ) of a lane, fixed for the CTA: head g8 (zero past G), the channel
// pairs (c, c + 1), c = cbase + 16 ks + 2 r, of each k-step (the mapping above).
template <int D, int G>
__device__ __forceinline__ void q_fragments(const __half (&s_qh)[G][D], int cbase, int g8,
                                            uint32_t (&bq)[D / 64][2]) {
#pragma unroll
  for (int ks = 0; ks < D / 64; ++ks) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint32_t v = 0u;
      if (g8 < G) {
        const int c = cbase + 16 * ks + 2 * r;
        v = (uint32_t)__half_as_ushort(s_qh[g8][c]) |
            ((uint32_t)__half_as_ushort(s_qh[g8][c + 1]) << 16);
      }
      bq[ks][r] = v;
    }
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
  constexpr int T = AKV_BLOCK_TOKENS, KSW = D / 64;          // k-steps per warp
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(G >= 1 && G <= 8, "at most 8 query heads per KV head");
  __shared__ __half s_qh[G][D];
  __shared__ __align__(16) int s_eq[G][D];
  __shared__ __align__(16) uint8_t s_tier[kMaxScoreSplit][D];
  __shared__ int s_phys[kMaxScoreSplit];
  // partial sums: row stride T + 1 and column t + t / 32, so that the fragment stores below
  // (lane (g8, tq) -> head 2tq + e, token 8 g8 + 2 mt) hit 32 distinct banks (docs/perf-notes.md)
  // (two buffers, alternating by block: see akv_score_block_epilogue)
  __shared__ float s_part[2][4][G][T + 1];

  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  const int nblk = (n + T - 1) / T;
  const int first = blockIdx.x * split_blocks;
  if (first >= nblk) return;
  const int count = min(split_blocks, nblk - first);
  const long long qhead = (long long)b * num_kv_heads * G + (long long)h * G;

  const int g8 = lane >> 2, tq = lane & 3;
  const int cbase = warp * (D / 4) + 4 * tq;               // + 16 ks + i: the lane's channels
  // Addressing: one 64-bit product per block (its plane base); the lane's own byte offsets
  // inside a block's planes are fixed, and each load adds a compile-time row offset, so a
  // load is one instruction (ptxas had spent ~10 integer instructions per load on 64-bit
  // row arithmetic; docs/perf-notes.md, sixth session).
  const int hi_lane = cbase * T + 8 * g8, ml_lane = cbase * (T / 2) + 4 * g8;
  // a lane's planes of one block: 4 channels per k-step, tokens 8g8 .. 8g8+7
  uint2 hi[KSW][4];
  uint32_t mid[KSW][4], lo[KSW][4];
  auto head_of = [&](int j) { return (long long)s_phys[j] * num_kv_heads + h; };
  auto load_hi = [&](int j) {         // read at every tier
    const uint8_t* p = k_hi + head_of(j) * (D * T) + hi_lane;
#pragma unroll
    for (int ks = 0; ks < KSW; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        hi[ks][i] = *reinterpret_cast<const uint2*>(p + (16 * ks + i) * T);
  };
  auto load_rest = [&](int j) {
    const long long off = head_of(j) * (D * T / 2) + ml_lane;
    const uint8_t* pm = k_mid + off;
    const uint8_t* pl = k_lo + off;
    rest_of_kstep<0>(&s_tier[j][cbase], pm, pl, mid[0], lo[0]);
    if constexpr (KSW > 1) rest_of_kstep<1>(&s_tier[j][cbase], pm, pl, mid[1], lo[1]);
  };
  akv3::score_prologue<D, G, kMaxScoreSplit>(
      b, h, n, first, count, q, q_sb, q_sh, block_table, blocks_per_seq, k_exp, num_kv_heads,
      full_mode, t8, t12, counters, k_tier_map, s_eq, s_tier, s_phys,
      [&](int g, int i, __half qh) { s_qh[g][i] = qh; }, [&] { load_hi(0); });
  // B fragments (qᵀ), fixed for the CTA: head g8 (zero past G), channel pairs of each k-step
  uint32_t bq[KSW][2];
  q_fragments<D, G>(s_qh, cbase, g8, bq);
  load_rest(0);                        // block 0's hi is in flight since the prologue
  // the lane's partial-sum slot in buffer 0: head 2 tq (+ e), token 8 g8 (+ 2 mt + 0/1);
  // lanes whose heads are past G store nothing, and their row is clamped into the array
  float* const sp0 = &s_part[0][warp][0][0] + min(2 * tq, G - 1) * (T + 1) + 8 * g8 + (g8 >> 2);
  for (int j = 0; j < count; ++j) {
    const int blk = first + j;
    float acc[4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[mt][k] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSW; ++ks)   // mid/lo hold their tier's refill (rest_of_kstep)
      kstep_mma(acc, hi[ks], mid[ks], lo[ks], bq[ks][0], bq[ks][1]);
    if (j + 1 < count) {               // in flight while this block is reduced
      load_hi(j + 1);
      load_rest(j + 1);
    }
    // this warp's quarter-channel sums: heads 2tq, 2tq+1 of tokens 8g8+2mt, +1
    // (column t + t / 32 = 8 g8 + g8 / 4 + 2 mt (+1): constant offsets from sp)
    float* const sp = sp0 + (j & 1) * (4 * G * (T + 1));
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (G >= 8 || 2 * tq + e < G) {
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          sp[e * (T + 1) + 2 * mt] = acc[mt][e];
          sp[e * (T + 1) + 2 * mt + 1] = acc[mt][2 + e];
        }
      }
    }
    __syncthreads();
    const auto& part = s_part[j & 1];
    akv_score_block_epilogue<G>(
        [&](int w, int g, int t) { return part[w][g][t + (t >> 5)]; }, warp, lane, blk, n, scale,
        scores_out, qhead, (long long)blocks_per_seq * T, blocks_per_seq, block_max, block_sum,
        block_arg);
  }
}

// ------------------------------------------------------------------------- split kernel
// The V-whole path's split kernel (akv_decode_split_whole_v7_*; docs/design.md "The
// V-whole path"): one CTA per (split, KV head, sequence) runs this version's scores kernel
// over its split, then version 6's V-whole values kernel over the same split, so a call is
// this launch and akv_decode_combine_rescale instead of three launches: one launch
// boundary and one prologue fewer, and no CTA of the values phase waits for the last CTA
// of the scores phase. The scores and block statistics go through the global workspace as
// between the two kernels (the same values, the same debug output); a CTA reads only what
// its own threads wrote before the barrier, through coherent loads (value_prologue's
// COHERENT: ld.global.cg, not the read-only path). Outputs, counters and tier maps equal
// those of the two kernels run one after the other with the same split (GPU tests).
// (Prefetching the split's V planes into L2 once its blocks are known was measured
// slower at every size, 0.5-4.8 us: docs/perf-notes.md, fifteenth session.)
template <int D, int G, int WS>
__device__ __forceinline__ void split_whole(
    const __half* q, long long q_sb, long long q_sh, const int* lengths,
    const int* block_table, int blocks_per_seq, const uint8_t* k_hi, const uint8_t* k_mid,
    const uint8_t* k_lo, const uint8_t* k_exp, const uint8_t* v_hi, const uint8_t* v_mid,
    const uint8_t* v_lo, int num_kv_heads, float scale, int full_mode, int t8, int t12,
    int split_blocks, float* scores_ws, float* block_max, float* block_sum, int* block_arg,
    float* partial, float* split_stats, unsigned long long* counters, uint8_t* k_tier_map,
    uint8_t* v_tier_map) {
  scores<D, G>(q, q_sb, q_sh, lengths, block_table, blocks_per_seq, k_hi, k_mid, k_lo, k_exp,
               num_kv_heads, scale, full_mode, t8, t12, split_blocks, scores_ws, block_max,
               block_sum, block_arg, counters, k_tier_map);
  __syncthreads();                     // this split's scores and block statistics are written
  akv5::values<D, G, WS, true, true>(
      lengths, block_table, blocks_per_seq, v_hi, v_mid, v_lo, nullptr, num_kv_heads, 1, 0, 0,
      0, 0, split_blocks, scores_ws, nullptr, nullptr, partial, counters, v_tier_map, block_max,
      block_sum, split_stats);
}


// ------------------------------------------------------------------------- flash kernel
// The V-whole path in one pass (akv_decode_flash_whole_v7_*; docs/design.md "The V-whole
// path"): one CTA per (split, KV head, sequence), as the split kernel, but each block's
// scores go straight into its p·V: block j's K and V planes are requested together, one
// iteration ahead (K_{j+1} once block j's q·Kᵀ is done, V_{j+1} once its p·V is done), and
// the weights are an online softmax over the split (running maximum m and sum l per head;
// what was accumulated is rescaled by exp(m_old - m_new) when the maximum moves). Nothing
// is read back from the workspace and there is no values prologue. K as this version's
// scores kernel (the same tiers, counters and score bits: the four warps' partial sums in
// the same order); V as version 6's V-whole values kernel (every valid token at tier 16,
// weights as two fp16 columns per head, x = e * 2^10 with e = exp(s - m) <= 1, the
// smallest subnormal for a positive weight whose lo term rounds to 0); its output is the
// split's normalised partial (· 1 / l) and (m, l) in split_stats, as the split kernel's,
// for akv_decode_combine_rescale. The scores go to the workspace only with the debug maps
// (k_tier_map set); the block statistics are not written (nothing reads them here).
// Two barriers per block: one before the partial sums are read, one before the weights and
// rescale factors are.
template <int D, int G, int WS>
__device__ __forceinline__ void flash_whole(
    const __half* __restrict__ q, long long q_sb, long long q_sh,
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ k_hi, const uint8_t* __restrict__ k_mid,
    const uint8_t* __restrict__ k_lo, const uint8_t* __restrict__ k_exp,
    const uint8_t* __restrict__ v_hi, const uint8_t* __restrict__ v_mid,
    const uint8_t* __restrict__ v_lo, int num_kv_heads, float scale, int full_mode, int t8,
    int t12, int split_blocks, float* __restrict__ scores_out, float*, float*, int*,
    float* __restrict__ partial, float* __restrict__ split_stats,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ k_tier_map,
    uint8_t* __restrict__ v_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, KSW = D / 64;
  constexpr int DW = D / WS, CH = DW / 8, MT = CH / 2, NWT = 4 / WS;
  constexpr int NT = (2 * G + 7) / 8, NCOL = 8 * NT, PSTRIDE = T + 8;
  constexpr int HPW = (G + 3) / 4;                          // heads per warp in the softmax
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(G >= 1 && G <= 8, "at most 8 query heads per KV head");
  static_assert(WS == 1 || WS == 2, "channel split");
  __shared__ __half s_qh[G][D];
  __shared__ __align__(16) int s_eq[G][D];
  __shared__ __align__(16) uint8_t s_tier[kMaxScoreSplit][D];
  __shared__ int s_phys[kMaxScoreSplit];
  // the four warps' partial sums (version 7's layout), then the 4/WS warps' outputs
  constexpr int PART = 4 * G * (T + 1), RED = NWT * G * D;
  __shared__ __align__(16) float s_union[PART > RED ? PART : RED];
  __shared__ __align__(16) __half s_ph[NCOL][PSTRIDE];     // one block's weights (P^T)
  __shared__ float s_alpha[G], s_l[G];
  auto s_part = reinterpret_cast<float(*)[G][T + 1]>(s_union);
  auto s_red = reinterpret_cast<float(*)[G][D]>(s_union);

  const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  const int nblk = (n + T - 1) / T;
  const int first = split * split_blocks;
  if (first >= nblk) return;
  const int count = min(split_blocks, nblk - first);
  if (split_blocks > kMaxScoreSplit) __trap();    // the host caps it (MAX_FLASH_SPLIT_BLOCKS)
  const long long qhead = ((long long)b * num_kv_heads + h) * G;
  const long long srow = (long long)blocks_per_seq * T;
  const int g8 = lane >> 2, tq = lane & 3;
  auto head_of = [&](int j) { return (long long)s_phys[j] * num_kv_heads + h; };

  // K: version 7's lane mapping (akv7::scores)
  const int cbase = warp * (D / 4) + 4 * tq;
  const int hi_lane = cbase * T + 8 * g8, ml_lane = cbase * (T / 2) + 4 * g8;
  uint2 khi[KSW][4];
  uint32_t kmid[KSW][4], klo[KSW][4];
  auto load_khi = [&](int j) {
    const uint8_t* p = k_hi + head_of(j) * (D * T) + hi_lane;
#pragma unroll
    for (int ks = 0; ks < KSW; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        khi[ks][i] = *reinterpret_cast<const uint2*>(p + (16 * ks + i) * T);
  };
  auto load_krest = [&](int j) {
    const long long off = head_of(j) * (D * T / 2) + ml_lane;
    rest_of_kstep<0>(&s_tier[j][cbase], k_mid + off, k_lo + off, kmid[0], klo[0]);
    if constexpr (KSW > 1)
      rest_of_kstep<1>(&s_tier[j][cbase], k_mid + off, k_lo + off, kmid[1], klo[1]);
  };
  // V: version 5's lane mapping (akv5::values), every valid token whole, past the end 0
  const int tok0 = (warp / WS) * 16 * WS + 4 * tq;
  const int ch0 = (warp % WS) * DW + CH * g8;
  akv5::Row<DW> vrow[WS][4];
  auto load_v = [&](int j) {
    const long long head = head_of(j);
    const uint8_t* vh = v_hi + head * T * D + ch0;
    const uint8_t* vm = v_mid + head * T * (D / 2) + ch0 / 2;
    const uint8_t* vl = v_lo + head * T * (D / 2) + ch0 / 2;
    const int rest = n - (first + j) * T;                   // valid tokens of block j
#pragma unroll
    for (int ks = 0; ks < WS; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = tok0 + 16 * ks + i;
        vrow[ks][i].load(vh + t * D, vm + t * (D / 2), vl + t * (D / 2), t < rest ? 16 : 0);
      }
  };

  akv3::score_prologue<D, G, kMaxScoreSplit>(
      b, h, n, first, count, q, q_sb, q_sh, block_table, blocks_per_seq, k_exp, num_kv_heads,
      full_mode, t8, t12, counters, k_tier_map, s_eq, s_tier, s_phys,
      [&](int g, int i, __half qh) { s_qh[g][i] = qh; }, [&] {
        load_khi(0);
        load_v(0);
      });
  // V's counters and tier map: every valid token of the split at tier 16
  const int valid_tokens = min(n, (first + count) * T) - first * T;
  if (counters && tid == 0) {
    atomicAdd(&counters[AKV_V_HI], (unsigned long long)(valid_tokens * D));
    atomicAdd(&counters[AKV_V_MID], (unsigned long long)(valid_tokens * D / 2));
    atomicAdd(&counters[AKV_V_LO], (unsigned long long)(valid_tokens * D / 2));
  }
  if (v_tier_map)
    for (int t = tid; t < valid_tokens; t += 128)
      v_tier_map[((long long)b * num_kv_heads + h) * srow + first * T + t] = 16;
  // the weight columns past the group's 2G stay 0
  for (int idx = tid; idx < (NCOL - 2 * G) * T; idx += 128)
    s_ph[2 * G + idx / T][idx % T] = __ushort_as_half(0);
  uint32_t bq[KSW][2];
  q_fragments<D, G>(s_qh, cbase, g8, bq);
  load_krest(0);
  float* const sp = &s_part[warp][0][0] + min(2 * tq, G - 1) * (T + 1) + 8 * g8 + (g8 >> 2);
  float m_run[HPW], l_run[HPW];                 // warp w: heads w, w + 4 (warp-uniform)
#pragma unroll
  for (int k = 0; k < HPW; ++k) m_run[k] = -INFINITY, l_run[k] = 0.f;
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[mt][nt][k] = 0.f;

  for (int j = 0; j < count; ++j) {
    const int blk = first + j;
    {
      float sacc[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int k = 0; k < 4; ++k) sacc[mt][k] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KSW; ++ks)
        kstep_mma(sacc, khi[ks], kmid[ks], klo[ks], bq[ks][0], bq[ks][1]);
      if (j + 1 < count) {               // in flight through this block's softmax and p·V
        load_khi(j + 1);
        load_krest(j + 1);
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (G >= 8 || 2 * tq + e < G) {
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            sp[e * (T + 1) + 2 * mt] = sacc[mt][e];
            sp[e * (T + 1) + 2 * mt + 1] = sacc[mt][2 + e];
          }
        }
      }
    }
    __syncthreads();                     // the partial sums are written
    // the block's scores (version 7's order and scale), the online softmax, the weights
#pragma unroll
    for (int k = 0; k < HPW; ++k) {
      const int g = warp + 4 * k;
      if (g < G) {
        float s[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int t = lane + 32 * u, c = t + (t >> 5);
          float v = ((s_part[0][g][c] + s_part[1][g][c]) + s_part[2][g][c]) + s_part[3][g][c];
          v *= scale;
          const bool valid = blk * T + t < n;
          if (valid && k_tier_map) scores_out[(qhead + g) * srow + (long long)blk * T + t] = v;
          s[u] = valid ? v : -INFINITY;
        }
        const float mo = m_run[k], mn = fmaxf(mo, akv_warp_max(fmaxf(s[0], s[1])));
        // exp(m_old - m_new): 1 where the maximum did not move (also -inf to -inf)
        const float alpha = mn == mo ? 1.f : exp2f((mo - mn) * 1.44269504f);
        float e[2];
#pragma unroll
        for (int u = 0; u < 2; ++u)
          e[u] = s[u] == -INFINITY ? 0.f : exp2f((s[u] - mn) * 1.44269504f);
        float es = e[0] + e[1];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) es += __shfl_xor_sync(0xffffffffu, es, o);
        m_run[k] = mn;
        l_run[k] = l_run[k] * alpha + es;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int t = lane + 32 * u;
          const float x = e[u] * 1024.f;
          const __half hi = __float2half_rz(x);
          __half lo = __float2half_rn(x - __half2float(hi));
          if (x > 0.f && __half_as_ushort(lo) == 0) lo = __ushort_as_half(1);
          s_ph[2 * g][t] = hi;
          s_ph[2 * g + 1][t] = lo;
        }
        if (lane == 0) s_alpha[g] = alpha;
      }
    }
    __syncthreads();                     // the weights and rescale factors are written
    float alpha[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) alpha[nt] = 4 * nt + tq < G ? s_alpha[4 * nt + tq] : 1.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[mt][nt][k] *= alpha[nt];
    const int vtier[4] = {16, 16, 16, 16};   // rows past the end were loaded as 0
#pragma unroll
    for (int ks = 0; ks < WS; ++ks)
      akv5::pv_kstep<DW, NT>(acc, vrow[ks], vtier, &s_ph[g8][tok0 + 16 * ks], PSTRIDE);
    if (j + 1 < count) load_v(j + 1);    // in flight through the next block's q·Kᵀ
  }
#pragma unroll
  for (int k = 0; k < HPW; ++k) {
    const int g = warp + 4 * k;
    if (g < G && lane == 0) {
      s_l[g] = l_run[k];
      split_stats[((qhead + g) * blocks_per_seq + split) * 2] = m_run[k];
      split_stats[((qhead + g) * blocks_per_seq + split) * 2 + 1] = l_run[k];
    }
  }
  __syncthreads();                       // every warp is done with s_part: it becomes s_red
  // a split whose scores are all -inf (l = 0) weighs 0 here and in the combine
  akv5::store_partial<D, G, WS>(acc, s_red, warp, tq, ch0, partial, qhead, blocks_per_seq,
                                split, [&](int g, float o) {
                                  return o * (s_l[g] > 0.f ? 1.f / s_l[g] : 0.f);
                                });
}

}  // namespace akv7

// The split and flash kernels' entry point (one per kernel, head_dim and group).
#define AKV7_SPLIT_WHOLE_ENTRY(NAME, FN, ...)                                                \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(                              \
      const __half* q, long long q_sb, long long q_sh, const int* lengths,                   \
      const int* block_table, int blocks_per_seq, const uint8_t* k_hi, const uint8_t* k_mid, \
      const uint8_t* k_lo, const uint8_t* k_exp, const uint8_t* v_hi, const uint8_t* v_mid,  \
      const uint8_t* v_lo, int num_kv_heads, int group, float scale, int full_mode, int t8,  \
      int t12, int split_blocks, float* scores, float* block_max, float* block_sum,          \
      int* block_arg, float* partial, float* split_stats, unsigned long long* counters,      \
      uint8_t* k_tier_map, uint8_t* v_tier_map) {                                            \
    FN(q, q_sb, q_sh, lengths, block_table, blocks_per_seq, k_hi, k_mid, k_lo, k_exp, v_hi,  \
       v_mid, v_lo, num_kv_heads, scale, full_mode, t8, t12, split_blocks, scores, block_max, \
       block_sum, block_arg, partial, split_stats, counters, k_tier_map, v_tier_map);        \
  }

// Version 7 entry points: the tensor-core scores kernel, version 6's values kernel.
// Minimum CTAs per SM of version 7's scores kernel: 6 (80 registers), but 9 at head_dim 64
// and groups up to 3, the occupancy of its 56-61 registers before the seventh session's
// register-path prologue (akv3::score_prologue), which ptxas would otherwise take to 67
// registers (no spills at 9).
#define AKV7_SCORE_MINB(D, G) (D == 64 && G <= 3 ? AKV_MINB_FIT(9) : 6)

// Minimum CTAs per SM of the flash kernel (akv7::flash_whole): 4 (at most 128 registers;
// 136-143 without the bound at head_dim 128, groups 1-4, no spills either way; 87-115 at
// head_dim 64), but 3 at head_dim 128 beyond group 4, where 4 would spill (92 bytes at group 8) and
// measured slower (Llama-3-70B shape 8 x 4k: 63.1 against 57.5 us; at group 4, Llama-3-8B
// 8 x 4k, 47.3 against 49.1; docs/perf-notes.md, seventeenth session).
#define AKV7_FLASH_MINB(D, G) (D == 128 && G > 4 ? 3 : 4)

#define AKV7_ENTRIES(MINB, WS, D, G)                                                         \
  AKV_SPLIT_SCORES_ENTRY(akv_decode_scores_v7_d##D##_g##G, (akv7::scores<D, G>), 128,        \
                         AKV7_SCORE_MINB(D, G))                                              \
  AKV_SPLIT_VALUES_ENTRY(akv_decode_values_v7_d##D##_g##G, (akv5::values<D, G, WS>), 128, MINB) \
  AKV_SPLIT_VALUES_WHOLE_ENTRY(akv_decode_values_whole_v7_d##D##_g##G,                       \
                               (akv5::values<D, G, WS, true>), 128, MINB)                    \
  AKV7_SPLIT_WHOLE_ENTRY(akv_decode_split_whole_v7_d##D##_g##G, (akv7::split_whole<D, G, WS>), \
                         128, AKV7_SCORE_MINB(D, G))                                                                                    \
  AKV7_SPLIT_WHOLE_ENTRY(akv_decode_flash_whole_v7_d##D##_g##G, (akv7::flash_whole<D, G, WS>), \
                         128, AKV7_FLASH_MINB(D, G))
