// Decode kernels, version 2: 16-byte plane loads, all of a thread's loads issued before use,
// branch-free tier refill, warp reduce-scatter. Same inputs, outputs and numerics as
// version 1 (akv.cu), so the estimate and combine kernels are shared.
//
// Refill without branches: at tier < 16 no value has exponent 31 (a block-channel of K or a
// block of V holding one is read at 16 bits), so a truncated value's low byte is the
// midpoint pattern. Substituting mid = 0x8 nibbles and lo = 0 nibbles at tier 8, and lo = 0x8
// nibbles at tier 12, gives exactly reference.join_planes' result.
#pragma once
#include "akv_planes.cuh"

namespace akv2 {

constexpr unsigned kFull = 0xffffffffu;

// 8 fp16 values from 8 hi bytes (h0: values 0-3, h1: 4-7) and 8 mid/lo nibbles (value k in
// bits 4k..4k+3 of m / l), as four half2 words (value pairs 01, 23, 45, 67).
__device__ __forceinline__ void assemble8(uint32_t h0, uint32_t h1, uint32_t m, uint32_t l,
                                          uint32_t out[4]) {
  const uint32_t even = akv_low_bytes_even(m, l);                        // values 0,2,4,6
  const uint32_t odd = akv_low_bytes_odd(m, l);                          // values 1,3,5,7
  const uint32_t low03 = __byte_perm(even, odd, 0x5140);                 // low bytes 0..3
  const uint32_t low47 = __byte_perm(even, odd, 0x7362);                 // low bytes 4..7
  out[0] = __byte_perm(low03, h0, 0x5140);
  out[1] = __byte_perm(low03, h0, 0x7362);
  out[2] = __byte_perm(low47, h1, 0x5140);
  out[3] = __byte_perm(low47, h1, 0x7362);
}

// 16 values (one uint4 of hi bytes, one uint2 each of mid and lo nibbles) -> fp32.
__device__ __forceinline__ void unpack16(uint4 hi, uint2 mid, uint2 lo, float out[16]) {
  uint32_t w[8];
  assemble8(hi.x, hi.y, mid.x, lo.x, w);
  assemble8(hi.z, hi.w, mid.y, lo.y, w + 4);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}

// mid/lo words to use at `tier`: loaded ones, or the midpoint substitutes.
__device__ __forceinline__ void tier_words(int tier, uint2& mid, uint2& lo) {
  if (tier < 12) {
    mid = make_uint2(0x88888888u, 0x88888888u);
    lo = make_uint2(0u, 0u);
  } else if (tier < 16) {
    lo = make_uint2(0x88888888u, 0x88888888u);
  }
}

// One reduce-scatter step over lanes `lane ^ offset`: the first n values of v shrink to n/2;
// `base` tracks which original index v[0] now stands for.
template <int N, int n>
__device__ __forceinline__ void rs_step(float (&v)[N], int offset, int lane, int& base) {
  const bool upper = lane & offset;
#pragma unroll
  for (int k = 0; k < n / 2; ++k) {
    const float send = upper ? v[k] : v[k + n / 2];
    const float keep = upper ? v[k + n / 2] : v[k];
    v[k] = keep + __shfl_xor_sync(kFull, send, offset);
  }
  if (upper) base += n / 2;
}

// ------------------------------------------------------------------------------- scores
// Grid (blocks, Hk, B), 128 threads. Warp w, lane l: token slice tq = l & 3 (16 tokens),
// channel c = round * 32 + w * 8 + (l >> 2) for rounds 0 .. D/32 - 1. Each round loads one
// uint4 of hi bytes and (as the channel's tier asks) one uint2 each of mid and lo nibbles.
// Partial dots are reduce-scattered over the 8 lanes of one token slice (xor 4, 8, 16), then
// summed over the 4 warps through shared memory.
template <int D, int G>
__device__ __forceinline__ void scores(
    const __half* __restrict__ q, long long q_sb, long long q_sh,
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ k_hi, const uint8_t* __restrict__ k_mid,
    const uint8_t* __restrict__ k_lo, const uint8_t* __restrict__ k_exp, int num_kv_heads,
    float scale, int full_mode, int t8, int t12, float* __restrict__ scores_out,
    float* __restrict__ block_max, float* __restrict__ block_sum, int* __restrict__ block_arg,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ k_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, ROUNDS = D / 32, N = 16 * G, KEEP = N / 8;
  __shared__ float s_q[G][D];
  __shared__ int s_a[G][D];
  __shared__ int s_amax[G];
  __shared__ int s_tier[D];
  __shared__ float s_part[4][4][N];   // [warp][token slice][value index]
  __shared__ float s_score[G][T];

  const int b = blockIdx.z, h = blockIdx.y, blk = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  if (blk * T >= n) return;
  const int phys = block_table[(long long)b * blocks_per_seq + blk];
  const long long head = (long long)phys * num_kv_heads + h;
  const uint8_t* kexp = k_exp + head * D;

  // q and the K tiers (as version 1)
  for (int i = tid; i < D; i += 128) {
    const int ek = kexp[i];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const __half qh = q[b * q_sb + (long long)(h * G + g) * q_sh + i];
      s_q[g][i] = __half2float(qh);
      s_a[g][i] = max((__half_as_ushort(qh) >> 10) & 0x1F, 1) + ek;
    }
  }
  __syncthreads();
  for (int g = warp; g < G; g += 4) {
    int m = 0;
    for (int i = lane; i < D; i += 32) m = max(m, s_a[g][i]);
    m = akv_warp_max_int(m);
    if (lane == 0) s_amax[g] = m;
  }
  __syncthreads();
  for (int i = tid; i < D; i += 128) {
    int tier = 8;
    if (full_mode || kexp[i] == AKV_SPECIAL_EXPONENT) {
      tier = 16;
    } else {
#pragma unroll
      for (int g = 0; g < G; ++g)
        tier = max(tier, akv_tier_from_gap(s_amax[g] - s_a[g][i], t8, t12));
    }
    s_tier[i] = tier;
    if (k_tier_map)
      k_tier_map[(((long long)b * num_kv_heads + h) * blocks_per_seq + blk) * D + i] = tier;
  }
  __syncthreads();
  if (counters && warp == 0) {
    int n12 = 0, n16 = 0;
    for (int i = lane; i < D; i += 32) {
      n12 += s_tier[i] >= 12;
      n16 += s_tier[i] >= 16;
    }
    n12 = akv_warp_sum_int(n12);
    n16 = akv_warp_sum_int(n16);
    if (lane == 0) {
      atomicAdd(&counters[AKV_K_HI], (unsigned long long)(T * D));
      atomicAdd(&counters[AKV_K_MID], (unsigned long long)(T / 2 * n12));
      atomicAdd(&counters[AKV_K_LO], (unsigned long long)(T / 2 * n16));
      atomicAdd(&counters[AKV_METADATA], (unsigned long long)D);
      atomicAdd(&counters[AKV_VALUES], (unsigned long long)(min(T, n - blk * T) * D));
    }
  }

  // all loads first
  const int tq = lane & 3, cs = lane >> 2;
  uint4 hi[ROUNDS];
  uint2 mid[ROUNDS], lo[ROUNDS];
  int tier[ROUNDS];
#pragma unroll
  for (int r = 0; r < ROUNDS; ++r) {
    const int c = r * 32 + warp * 8 + cs;
    const long long row = head * D + c;
    tier[r] = s_tier[c];
    hi[r] = *reinterpret_cast<const uint4*>(k_hi + row * T + 16 * tq);
    mid[r] = make_uint2(0u, 0u);
    lo[r] = make_uint2(0u, 0u);
    if (tier[r] >= 12) mid[r] = *reinterpret_cast<const uint2*>(k_mid + row * (T / 2) + 8 * tq);
    if (tier[r] >= 16) lo[r] = *reinterpret_cast<const uint2*>(k_lo + row * (T / 2) + 8 * tq);
  }
  float acc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = 0.f;
#pragma unroll
  for (int r = 0; r < ROUNDS; ++r) {
    const int c = r * 32 + warp * 8 + cs;
    tier_words(tier[r], mid[r], lo[r]);
    float kv[16];
    unpack16(hi[r], mid[r], lo[r], kv);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float qv = s_q[g][c];
#pragma unroll
      for (int t = 0; t < 16; ++t) acc[g * 16 + t] = fmaf(qv, kv[t], acc[g * 16 + t]);
    }
  }
  // reduce over the 8 channel lanes of this token slice, then over warps
  int base = 0;
  rs_step<N, N>(acc, 4, lane, base);
  rs_step<N, N / 2>(acc, 8, lane, base);
  rs_step<N, N / 4>(acc, 16, lane, base);
#pragma unroll
  for (int k = 0; k < KEEP; ++k) s_part[warp][tq][base + k] = acc[k];
  __syncthreads();
  for (int idx = tid; idx < G * T; idx += 128) {
    const int g = idx / T, t = idx % T;
    const int slice = t / 16, v = g * 16 + t % 16;
    float s = ((s_part[0][slice][v] + s_part[1][slice][v]) + s_part[2][slice][v]) +
              s_part[3][slice][v];
    s *= scale;
    const int tok = blk * T + t;
    const bool valid = tok < n;
    s_score[g][t] = valid ? s : -INFINITY;
    if (valid)
      scores_out[((long long)b * num_kv_heads * G + h * G + g) * ((long long)blocks_per_seq * T) + tok] = s;
  }
  __syncthreads();
  for (int g = warp; g < G; g += 4) {
    const long long at = ((long long)b * num_kv_heads * G + h * G + g) * blocks_per_seq + blk;
    akv_block_stats(s_score[g], lane, blk, at, block_max, block_sum, block_arg);
  }
}

// ------------------------------------------------------------------------------- values
// Grid (blocks, Hk, B), 128 threads. Lane l: channel slice cs = l % (D/16) (16 channels),
// token t = round * 4 * TPW + warp * TPW + l / (D/16), TPW = 32 / (D/16) tokens per warp
// instruction. Tiers and weights as version 1; partial outputs reduce-scattered over the
// lanes of one channel slice, then summed over the 4 warps.
template <int D, int G>
__device__ __forceinline__ void values(
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ v_hi, const uint8_t* __restrict__ v_mid,
    const uint8_t* __restrict__ v_lo, const uint8_t* __restrict__ v_exp, int num_kv_heads,
    int full_mode, int t8, int t12, int skip, int bias,
    const float* __restrict__ scores_in,
    const float* __restrict__ stats, const float* __restrict__ o_est,
    float* __restrict__ partial, unsigned long long* __restrict__ counters,
    uint8_t* __restrict__ v_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, SLICES = D / 16, TPW = 32 / SLICES;
  constexpr int ROUNDS = T / (4 * TPW), N = 16 * G;
  constexpr int STEPS = TPW == 4 ? 2 : 3;        // lanes sharing a slice: TPW
  constexpr int KEEP = N >> STEPS;
  __shared__ int s_rmin[G][4];
  __shared__ int s_r[G];
  __shared__ int s_special;
  __shared__ float s_p[G][T];
  __shared__ int s_tier[T];
  __shared__ float s_part[4][SLICES][N];

  const int b = blockIdx.z, h = blockIdx.y, blk = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  if (blk * T >= n) return;
  const int phys = block_table[(long long)b * blocks_per_seq + blk];
  const long long head = (long long)phys * num_kv_heads + h;
  const int num_q_heads = num_kv_heads * G;
  const uint8_t* vexp = v_exp + head * D;

  if (tid == 0) s_special = 0;
  __syncthreads();
  // (full mode reads V whole: no reference exponent, no exponent maxima read or counted)
#pragma unroll
  for (int g = 0; g < G; ++g) {
    int r = 0x7fffffff;
    for (int d = tid; d < (full_mode ? 0 : D); d += 128) {
      const int ev = vexp[d];
      if (g == 0 && ev == AKV_SPECIAL_EXPONENT) s_special = 1;
      const float oe = o_est[((long long)b * num_q_heads + h * G + g) * D + d];
      r = min(r, akv_unbiased_exp32(oe) - ((ev < 1 ? 1 : ev) - 15));
    }
    r = akv_warp_min_int(r);
    if (lane == 0) s_rmin[g][warp] = r;
  }
  __syncthreads();
  if (tid < G) s_r[tid] = min(min(s_rmin[tid][0], s_rmin[tid][1]),
                              min(s_rmin[tid][2], s_rmin[tid][3])) + bias;
  __syncthreads();
  if (tid < T) {
    const int tok = blk * T + tid;
    const bool valid = tok < n;
    int tier = 0;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const long long qrow = (long long)b * num_q_heads + h * G + g;
      float p = 0.f;
      if (valid) {
        const float s = scores_in[qrow * ((long long)blocks_per_seq * T) + tok];
        p = expf(s - stats[qrow * 2]) / stats[qrow * 2 + 1];
      }
      s_p[g][tid] = p;
      tier = max(tier, akv_v_tier_from_gap(s_r[g] - akv_unbiased_exp32(p),
                                           skip + akv_skip_budget(n), t8, t12));
    }
    if (full_mode || s_special) tier = 16;
    s_tier[tid] = valid ? tier : 0;
    if (v_tier_map && valid)
      v_tier_map[((long long)b * num_kv_heads + h) * ((long long)blocks_per_seq * T) + tok] = tier;
  }
  __syncthreads();
  if (counters && warp < 2) {
    const int tr = s_tier[tid];
    const int n8 = akv_warp_sum_int(tr > 0), n12 = akv_warp_sum_int(tr >= 12),
              n16 = akv_warp_sum_int(tr >= 16);
    if (lane == 0) {
      atomicAdd(&counters[AKV_V_HI], (unsigned long long)(n8 * D));
      atomicAdd(&counters[AKV_V_MID], (unsigned long long)(n12 * D / 2));
      atomicAdd(&counters[AKV_V_LO], (unsigned long long)(n16 * D / 2));
      if (warp == 0 && !full_mode) atomicAdd(&counters[AKV_METADATA], (unsigned long long)D);
    }
  }

  const int cs = lane % SLICES, tw = lane / SLICES;
  const uint8_t* vhi = v_hi + head * T * D;
  const uint8_t* vmid = v_mid + head * T * (D / 2);
  const uint8_t* vlo = v_lo + head * T * (D / 2);
  uint4 hi[ROUNDS];
  uint2 mid[ROUNDS], lo[ROUNDS];
  int tier[ROUNDS];
#pragma unroll
  for (int r = 0; r < ROUNDS; ++r) {
    const int t = r * 4 * TPW + warp * TPW + tw;
    tier[r] = s_tier[t];
    hi[r] = make_uint4(0u, 0u, 0u, 0u);
    mid[r] = make_uint2(0u, 0u);
    lo[r] = make_uint2(0u, 0u);
    if (tier[r] > 0) hi[r] = *reinterpret_cast<const uint4*>(vhi + t * D + 16 * cs);
    if (tier[r] >= 12) mid[r] = *reinterpret_cast<const uint2*>(vmid + t * (D / 2) + 8 * cs);
    if (tier[r] >= 16) lo[r] = *reinterpret_cast<const uint2*>(vlo + t * (D / 2) + 8 * cs);
  }
  float acc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = 0.f;
#pragma unroll
  for (int r = 0; r < ROUNDS; ++r) {
    const int t = r * 4 * TPW + warp * TPW + tw;
    if (tier[r] == 0) continue;
    tier_words(tier[r], mid[r], lo[r]);
    float vv[16];
    unpack16(hi[r], mid[r], lo[r], vv);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = s_p[g][t];
#pragma unroll
      for (int k = 0; k < 16; ++k) acc[g * 16 + k] = fmaf(p, vv[k], acc[g * 16 + k]);
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
    partial[(((long long)b * num_q_heads + h * G + g) * blocks_per_seq + blk) * D + d] = o;
  }
}

}  // namespace akv2

#define AKV2_ENTRIES(D, G)                                                                   \
  extern "C" __global__ void __launch_bounds__(128) akv_decode_scores_v2_d##D##_g##G(       \
      const __half* q, long long q_sb, long long q_sh, const int* lengths,                   \
      const int* block_table, int blocks_per_seq, const uint8_t* k_hi, const uint8_t* k_mid, \
      const uint8_t* k_lo, const uint8_t* k_exp, int num_kv_heads, int group, float scale,   \
      int full_mode, int t8, int t12, float* scores, float* block_max, float* block_sum,     \
      int* block_arg, unsigned long long* counters, uint8_t* k_tier_map) {                   \
    akv2::scores<D, G>(q, q_sb, q_sh, lengths, block_table, blocks_per_seq, k_hi, k_mid,     \
                       k_lo, k_exp, num_kv_heads, scale, full_mode, t8, t12, scores,         \
                       block_max, block_sum, block_arg, counters, k_tier_map);               \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(128) akv_decode_values_v2_d##D##_g##G(       \
      const int* lengths, const int* block_table, int blocks_per_seq, const uint8_t* v_hi,   \
      const uint8_t* v_mid, const uint8_t* v_lo, const uint8_t* v_exp, int num_kv_heads,     \
      int group, int full_mode, int t8, int t12, int skip, int bias, const float* scores,    \
      const float* stats, const float* o_est, float* partial, unsigned long long* counters,  \
      uint8_t* v_tier_map) {                                                                 \
    akv2::values<D, G>(lengths, block_table, blocks_per_seq, v_hi, v_mid, v_lo, v_exp,       \
                       num_kv_heads, full_mode, t8, t12, skip, bias, scores, stats, o_est,   \
                       partial, counters, v_tier_map);                                       \
  }
