// Decode kernels, version 5: the values phase (p·V) on tensor cores.
//
// Version 3's values kernel spent ~9 instructions per value read (docs/perf-notes.md: fp16
// assembly, fp16 -> fp32 conversion, one FMA per query head of the GQA group, reductions):
// it was bound by instructions, not bytes. Here each warp assembles fp16 operands straight
// from the planes into mma fragments (~2 instructions per value) and lets
// `mma.sync.m16n8k16` (fp16 in, fp32 accumulate) do the products and sums, for every head
// of the group at once.
//
// The product is out^T[D, cols] = V^T[D, 16 tokens] · P^T[16 tokens, cols], one m16n8k16 per
// 16 channels, per 16 tokens and per 8 columns. Columns hold the weights as two fp16 terms
// per query head: column 2g = hi(p_g), column 2g+1 = lo(p_g), where
//   x = p * 2^10,  hi = fp16 round-toward-zero(x),  lo = fp16 round-to-nearest(x - hi),
// so hi + lo carries x to ~22 bits (fp32-level weights, unlike a single fp16 P) and lo >= 0.
// The 2^10 keeps weights down to 2^-24 out of fp16's subnormal range (p <= 1, so x <= 1024);
// the sum is scaled back by 2^-10 exactly.
//
// Fragment mapping (PTX ISA, mma.m16n8k16 .f16 A row / B col, lane = 4*g + tq):
//   A (V^T): a0 = (row g, k 2tq..2tq+1), a1 = (row g+8, same k), a2 = (row g, k 2tq+8..+9),
//            a3 = (row g+8, k 2tq+8..+9);  B (P^T): b0 = (k 2tq..2tq+1, col g), b1 = k+8;
//   C: c0, c1 = (row g, cols 2tq, 2tq+1), c2, c3 = (row g+8, cols 2tq, 2tq+1).
// Rows and k are free to map to any channels and tokens as long as A and B agree:
//   k 2tq+e -> token 4tq+e and k 2tq+8+e -> token 4tq+2+e of the warp's 16 tokens (so the
//   lane's own four loaded rows, and b0/b1 are adjacent weights: one 8-byte shared load);
//   m-tile mt, rows g / g+8 -> channels CH*g + 2mt / CH*g + 2mt + 1 (the lane's own slice).
// So a lane loads 4 token rows x CH = D/8 channels (one 16-byte hi load per row at D = 128),
// and C's c0 + c1 is head tq's output for one channel, c2 + c3 for the next.
//
// Special values: a block of V holding an exponent-31 value is read at 16 bits (as in every
// version); there, a weight p > 0 whose lo term would be 0 gets the smallest subnormal
// instead, so that Inf * hi + Inf * lo stays Inf (Inf * 0 would be NaN; lo >= 0 rules out
// Inf - Inf) at a cost of <= 2^-34 absolute per weight. Not below p = 2^-34, where hi is 0
// too (x < 2^-24) and Inf * hi gives NaN (float64 attention: +Inf).
//
// The scores kernel of this version is version 3's. Numerics: the same tiers, statistics and
// byte counts as versions 1-4; the output differs in summation order and in the weights'
// 22-bit (instead of 24-bit) representation.
#pragma once
#include "akv_decode_v3.cuh"

namespace akv5 {

using akv2::tier_words;
using akv3::kMaxSplit;

// C += A · B for one m16n8k16 tile (fp16 operands, fp32 accumulate). Turing (sm_75) has no
// k16 shape: two k8 steps with the same fragments (a0 a1 b0, then a2 a3 b1).
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a2), "r"(a3), "r"(b1));
#endif
}

// One token row of a lane's channel slice: hi bytes, mid and lo nibbles (CH = D/8 channels).
template <int D>
struct Row;
template <>
struct Row<128> {           // 16 channels: 16 hi bytes, 8 mid bytes, 8 lo bytes
  uint4 hi;
  uint2 mid, lo;
  __device__ __forceinline__ void load(const uint8_t* h, const uint8_t* m, const uint8_t* l,
                                       int tier) {
    hi = make_uint4(0u, 0u, 0u, 0u);
    mid = make_uint2(0u, 0u);
    lo = make_uint2(0u, 0u);
    if (tier > 0) hi = *reinterpret_cast<const uint4*>(h);
    if (tier >= 12) mid = *reinterpret_cast<const uint2*>(m);
    if (tier >= 16) lo = *reinterpret_cast<const uint2*>(l);
  }
  // channels 8 half .. 8 half + 7 at `tier`: hi words (channels 0-3, 4-7 of the eight),
  // mid and lo words with the tier's refill (akv2::tier_words)
  __device__ __forceinline__ void part(int half, int tier, uint32_t& hx, uint32_t& hy,
                                       uint32_t& m, uint32_t& l) const {
    uint2 mm = mid, ll = lo;
    tier_words(tier, mm, ll);
    hx = half ? hi.z : hi.x;
    hy = half ? hi.w : hi.y;
    m = half ? mm.y : mm.x;
    l = half ? ll.y : ll.x;
  }
};
template <>
struct Row<64> {            // 8 channels: 8 hi bytes, 4 mid bytes, 4 lo bytes
  uint2 hi;
  uint32_t mid, lo;
  __device__ __forceinline__ void load(const uint8_t* h, const uint8_t* m, const uint8_t* l,
                                       int tier) {
    hi = make_uint2(0u, 0u);
    mid = lo = 0u;
    if (tier > 0) hi = *reinterpret_cast<const uint2*>(h);
    if (tier >= 12) mid = *reinterpret_cast<const uint32_t*>(m);
    if (tier >= 16) lo = *reinterpret_cast<const uint32_t*>(l);
  }
  __device__ __forceinline__ void part(int, int tier, uint32_t& hx, uint32_t& hy, uint32_t& m,
                                       uint32_t& l) const {
    uint2 mm = make_uint2(mid, 0u), ll = make_uint2(lo, 0u);
    tier_words(tier, mm, ll);
    hx = hi.x;
    hy = hi.y;
    m = mm.x;
    l = ll.x;
  }
};

// One k-step of p·V, out^T += V^T · P^T (mapping above), for a lane's four token rows of its
// channel slice (`row`, read at `tier`) and their weights in shared memory: `ph` points at
// the lane's first row in P^T's row g (column g of P^T for head column g; the lane's g8),
// rows 8 nt + g8 lie `pstride` halves apart. The A registers come straight from the planes
// (akv_pair_frags over the row pairs (0, 1) and (2, 3); twelfth session): a0 = channel 2mt,
// tokens 0 1; a1 = channel 2mt+1; a2, a3 the same of tokens 2 3. Shared by the values
// kernels and the flash kernel (akv7::flash_whole).
template <int DW, int NT>
__device__ __forceinline__ void pv_kstep(float (&acc)[DW / 16][NT][4], const Row<DW> (&row)[4],
                                         const int (&tier)[4], const __half* ph, int pstride) {
  constexpr int CH = DW / 8, MT = CH / 2;
  uint2 pb[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    pb[nt] = *reinterpret_cast<const uint2*>(ph + 8 * nt * pstride);
  uint32_t a0[CH / 8][4], a1[CH / 8][4], a2[CH / 8][4], a3[CH / 8][4];   // m-tile 4 half + k
#pragma unroll
  for (int half = 0; half < CH / 8; ++half) {
    uint32_t hx[4], hy[4], m[4], l[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) row[r].part(half, tier[r], hx[r], hy[r], m[r], l[r]);
    akv_pair_frags(hx[0], hy[0], m[0], l[0], hx[1], hy[1], m[1], l[1], a0[half], a1[half]);
    akv_pair_frags(hx[2], hy[2], m[2], l[2], hx[3], hy[3], m[3], l[3], a2[half], a3[half]);
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      mma16816(acc[mt][nt], a0[mt / 4][mt % 4], a1[mt / 4][mt % 4], a2[mt / 4][mt % 4],
               a3[mt / 4][mt % 4], pb[nt].x, pb[nt].y);
}

// A split's output from the warps' p·V accumulators: head g's columns (hi, lo) summed per
// channel, the 4 / WS token groups' sums added through shared memory `s_red` (the caller
// synchronises before: it may alias the main loop's buffers), then
// partial[(qhead + g) * blocks_per_seq + split][d] = sum · 2^-10 · scale(g).
template <int D, int G, int WS, int MT, int NT, class Scale>
__device__ __forceinline__ void store_partial(const float (&acc)[MT][NT][4], float (*s_red)[G][D],
                                              int warp, int tq, int ch0, float* partial,
                                              long long qhead, int blocks_per_seq, int split,
                                              Scale&& scale) {
  constexpr int NWT = 4 / WS;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int g = 4 * nt + tq;
    if (g < G) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int c = ch0 + 2 * mt;
        s_red[warp / WS][g][c] = acc[mt][nt][0] + acc[mt][nt][1];
        s_red[warp / WS][g][c + 1] = acc[mt][nt][2] + acc[mt][nt][3];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += 128) {
    const int g = idx / D, d = idx % D;
    float o = s_red[0][g][d];
#pragma unroll
    for (int w = 1; w < NWT; ++w) o += s_red[w][g][d];
    partial[((qhead + g) * blocks_per_seq + split) * D + d] = scale(g, o * (1.f / 1024.f));
  }
}

// ------------------------------------------------------------------------------- values
// Grid (splits, Hk, B), 128 threads; split s covers blocks s*S .. s*S+S-1 of sequence b.
// Prologue as version 3 (reference exponents, weights, tiers), but the weights go to shared
// memory as the hi/lo fp16 columns of P^T, zero for tokens that are not read. Main loop:
// warp w takes tokens 16w .. 16w+15 of each block, lane (g, tq) its rows 4tq .. 4tq+3 and
// channels CH*g .. CH*g+CH-1; one mma per (m-tile, n-tile). Epilogue: c0+c1 / c2+c3 per head
// and channel, summed over the 4 warps through shared memory.
// COHERENT (the split kernel, akv7::split_whole): the scores and block statistics were
// written by this CTA earlier in the same kernel, so they are read with ld.global.cg.
template <int D, int G, int WS, bool WHOLE = false, bool COHERENT = false>
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
  // WS warps share a block's channels: warp w takes channels (w % WS) * D/WS .. and tokens
  // (w / WS) * 16*WS .. of each block, in WS k-steps of 16 (fewer accumulators per lane)
  constexpr int T = AKV_BLOCK_TOKENS, DW = D / WS, CH = DW / 8, MT = CH / 2, NWT = 4 / WS;
  constexpr int NT = (2 * G + 7) / 8, NCOL = 8 * NT;
  constexpr int PSTRIDE = kMaxSplit * T + 8;            // halves; +8 staggers the banks
  constexpr int PBYTES = NCOL * PSTRIDE * 2, RBYTES = NWT * G * D * 4;
  constexpr int UBYTES = PBYTES > RBYTES ? PBYTES : RBYTES;
  static_assert(2 * G <= 16, "at most 8 query heads per KV head");
  static_assert(WS == 1 || WS == 2, "channel split");
  __shared__ __align__(16) int s_eo[G][D];
  __shared__ int s_phys[kMaxSplit];
  __shared__ int s_r[kMaxSplit][G];
  __shared__ int s_special[kMaxSplit];
  __shared__ uint8_t s_tier[kMaxSplit * T];
  // P^T columns during the main loop, then the 4 warps' partial outputs
  __shared__ __align__(16) uint8_t s_union[UBYTES];
  auto s_ph = reinterpret_cast<__half(*)[PSTRIDE]>(s_union);
  auto s_red = reinterpret_cast<float(*)[G][D]>(s_union);   // [NWT][G][D]

  const int b = blockIdx.z, h = blockIdx.y, split = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  const int nblk = (n + T - 1) / T;
  const int first = split * split_blocks;
  if (first >= nblk) return;
  const int count = min(split_blocks, nblk - first);
  const int num_q_heads = num_kv_heads * G;
  const long long qhead = (long long)b * num_q_heads + (long long)h * G;

  akv3::value_prologue<D, G, kMaxSplit, WHOLE, COHERENT>(
      b, h, n, first, count, block_table, blocks_per_seq, v_exp, num_kv_heads, full_mode, t8,
      t12, skip, bias, scores_in, stats, o_est, counters, v_tier_map, s_eo, s_phys,
      s_r, s_special, s_tier, [&](int t, int tier, bool special, const float* p) {
        // the weights as two fp16 columns per head (reference.mma_weight_terms); a token
        // that is not read gets x = 0, so hi = lo = 0 (no branch)
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float x = tier > 0 ? p[g] * 1024.f : 0.f;
          const __half hi = __float2half_rz(x);
          __half lo = __float2half_rn(x - __half2float(hi));
          if (special && x > 0.f && __half_as_ushort(lo) == 0) lo = __ushort_as_half(1);
          s_ph[2 * g][t] = hi;
          s_ph[2 * g + 1][t] = lo;
        }
#pragma unroll
        for (int c = 2 * G; c < NCOL; ++c) s_ph[c][t] = __ushort_as_half(0);
      }, split, block_max, block_sum, split_stats);

  const int g8 = lane >> 2, tq = lane & 3;
  const int tok0 = (warp / WS) * 16 * WS + 4 * tq;       // the lane's first row of a block
  const int ch0 = (warp % WS) * DW + CH * g8;             // the lane's first channel
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[mt][nt][k] = 0.f;

  for (int j = 0; j < count; ++j) {
    const long long head = (long long)s_phys[j] * num_kv_heads + h;
    const uint8_t* vhi = v_hi + head * T * D + ch0;
    const uint8_t* vmid = v_mid + head * T * (D / 2) + ch0 / 2;
    const uint8_t* vlo = v_lo + head * T * (D / 2) + ch0 / 2;
    Row<DW> row[WS][4];
    int tier[WS][4];
#pragma unroll
    for (int ks = 0; ks < WS; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = tok0 + 16 * ks + i;
        tier[ks][i] = s_tier[j * T + t];
        row[ks][i].load(vhi + t * D, vmid + t * (D / 2), vlo + t * (D / 2), tier[ks][i]);
      }
#pragma unroll
    for (int ks = 0; ks < WS; ++ks)
      pv_kstep<DW, NT>(acc, row[ks], tier[ks], &s_ph[g8][j * T + tok0 + 16 * ks], PSTRIDE);
  }
  __syncthreads();                      // every warp is done with s_ph: it becomes s_red
  store_partial<D, G, WS>(acc, s_red, warp, tq, ch0, partial, qhead, blocks_per_seq, split,
                          [](int, float o) { return o; });
}

}  // namespace akv5

// Version 5 entry points: version 3's scores kernel, the tensor-core values kernel.
#define AKV5_ENTRIES(V, MINB, WS, D, G)                                                      \
  AKV_SPLIT_SCORES_ENTRY(akv_decode_scores_v##V##_d##D##_g##G, (akv3::scores<D, G, 0>), 128, \
                         AKV3_SCORE_MINB(0, D, G))                                           \
  AKV_SPLIT_VALUES_ENTRY(akv_decode_values_v##V##_d##D##_g##G, (akv5::values<D, G, WS>),      \
                         128, MINB)                                                          \
  AKV_SPLIT_VALUES_WHOLE_ENTRY(akv_decode_values_whole_v##V##_d##D##_g##G,                   \
                               (akv5::values<D, G, WS, true>), 128, MINB)
