// akv_fused: the whole precision-aligned decode call in one launch of thread-block clusters,
// for sequences of at most kFusedMaxBlocks (64) blocks of 64 tokens (4096 tokens).
//
// Why: at 4k tokens the four-launch path of cuda/akv.cu (scores, estimate, values, combine)
// is a chain of dependent steps of a few memory round trips each: GQA 1 x 4k took 7.1 +
// 6.0 + 6.4 + 2.6 us against eager attention's 18 (docs/perf-notes.md, ninth session).
// Here one cluster of CL CTAs (the host's choice, 8 or 16; sm_90 and later) serves one
// (sequence, KV head); CTA r of the cluster owns `bpc` consecutive blocks. What the
// estimate needs and the partial outputs travel through distributed shared memory, each
// CTA writing its values into the others' shared memory before a cluster barrier (remote
// stores, so nobody waits on a remote load), instead of global memory and new launches;
// the planes are copied into shared memory with cp.async (16-byte chunks, only the rows a
// tier asks for), so a CTA has its blocks' bytes in flight at once.
//
// The rule is DESIGN.md sections 4-5 as the four-launch path applies it (docs/design.md),
// with fp32 sums in other orders (l, O_est, scores, outputs):
//  1. K tiers per (block, channel) from q's and the block's exponent maxima; fp32 scores
//     s = scale * q . k at those tiers on tensor cores (version 7's fragment mapping); per
//     block and query head the maximum, first arg-max and sum of exp(s - max), written
//     into every CTA of the cluster.
//  2. [cluster barrier 1] Every CTA computes, for each query head of the group, m = max,
//     l = sum of exp(s - m) and the top-k blocks by maximum (ties to the lower block;
//     the same bits in every CTA: the same inputs and operations). CTA r computes its
//     slice of O_est[d] = sum over the slots of p_j * |v_jd at tier 8| for each slot
//     block's arg-max token (reference.decode_attention) and writes the exponents into
//     every CTA. [cluster barrier 2]
//  3. V tiers per token from p = 2^((s - m) log2 e) / l, O_est and the block's V exponent
//     maxima (with the skip tier and its budget), V rows at those tiers, partial
//     sum_j p_j v_j over the CTA's tokens, each element written into the CTA that owns
//     its slice of the output. [cluster barrier 3]
//  4. CTA r sums its slice over the cluster's partials in rank order and writes fp16. No
//     CTA touches another's shared memory after barrier 3, so none waits before leaving
//     (barrier.cluster.arrive at the start and its wait before the first remote store
//     make sure every CTA of the cluster runs before anything is written into it).
// Only rank 0 adds the estimate's bytes to the counters, once per query head, as the four
// launches count them. K tiers equal the reference's exactly; a V tier can differ where a
// weight or an O_est element lies at a power of two, as the sums' orders differ (O_est is
// summed in interleaved parts, l from the block statistics after their maximum); outputs
// equal the reference up to fp32 summation order (GPU tests, tests/test_gpu_fused.py).
// Measured (docs/perf-notes.md, tenth session): faster than the four launches only with
// few clusters; the host's rule is CudaBackend._use_fused.
// Repeated here on purpose: the group's K tier loop of akv3::score_prologue and
// akv_block_stats2's reductions. Moving them into shared helpers changes the SASS of 48 of
// the four launches' scores kernels (cuobjdump compared, the same instruction counts, other
// schedules), which would need the GPU check to run again; a session with device time for
// it can share them. Version 7's k-step (fp16 assembly and mma) is shared since the twelfth
// session: akv7::kstep_mma.
//
// grid (CL, Hk, B), cluster (CL, 1, 1), block kFusedThreads (512) threads, dynamic shared
// memory fused_smem_bytes(D, G, bpc) (kernels.py mirrors it). Requires CL * bpc >= the
// longest sequence's blocks, bpc <= kFusedMaxBpc, CL <= 16, topk >= 1. Debug: with
// k_tier_map set, the kernel also writes the tier maps, scores, stats (m, l) and O_est to
// the workspace as the four launches do.
#include "akv_decode_v7.cuh"   // akv2::tier_words, akv7::kstep_mma (and akv_decode_v5.cuh)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif

constexpr int kFusedThreads = 512;
constexpr int kFusedWarps = kFusedThreads / 32;
constexpr int kFusedMaxBlocks = 64;   // blocks per sequence (the estimate: 2 per lane)
constexpr int kFusedMaxBpc = 8;       // blocks per CTA
static_assert(kFusedWarps == 16 && kFusedMaxBlocks == 2 * 32 && kFusedMaxBpc <= 8,
              "kernels.py mirrors these; the estimate holds two blocks per lane");

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
namespace akvf {
namespace cg = cooperative_groups;
// Phase timestamps for measurements only (scripts/fused_timeline.py builds a separate cubin
// with -DAKVF_TIMING; the project's cubins have none of this): the SM clock at each mark
// of the CTAs of (KV head 0, sequence 0), one row per cluster rank, and every CTA's start
// and end on the global timer.
#ifdef AKVF_TIMING
__device__ long long akvf_times[16][24];
__device__ unsigned long long akvf_span[256][16][2];   // [cluster y + z*Hk][rank][start, end] ns
__device__ __forceinline__ unsigned long long akvf_gt() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
#define AKVF_MARK(i)                                                                       \
  if (threadIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) akvf_times[blockIdx.x][i] = clock64(); \
  if (threadIdx.x == 0 && (i == 0 || i == 17) && blockIdx.y + blockIdx.z * gridDim.y < 256)        \
    akvf_span[blockIdx.y + blockIdx.z * gridDim.y][blockIdx.x][i == 17] = akvf_gt();               \
  __syncwarp();
#else
#define AKVF_MARK(i)
#endif
constexpr int T = AKV_BLOCK_TOKENS;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Four consecutive values sharing one tier (akv_join4's inputs: hi4 holds 4 hi bytes, mid2 /
// lo2 4 nibbles each, value k in bits 4k..4k+3) -> 4 floats, with byte permutes instead of
// per-value shifts. Not for Inf/NaN at a truncated tier (no special refill): the decode
// rule never reads them there (a K channel or V block holding exponent 31 is read at 16
// bits; docs/design.md), so the result equals akv_join4's.
// Where K channel c's rows sit in a block's shared-memory slab: the low two bits of c XOR
// bits 2-3, so that the four lanes of a quad (channels 4 apart, tq = 0..3) read different
// banks in the scores step.
__device__ __forceinline__ int kperm(int c) { return (c & ~3) | ((c ^ (c >> 2)) & 3); }

__device__ __forceinline__ uint32_t spread_nibbles(uint32_t x) {   // bytes: n0, n2, n1, n3
  return (x & 0x0F0Fu) | ((x & 0xF0F0u) << 12);
}
__device__ __forceinline__ void join4_fast(uint32_t hi4, uint32_t mid2, uint32_t lo2, int tier,
                                           float out[4]) {
  uint32_t low = 0x80808080u;                                      // tier 8 refill
  if (tier >= 12) low = (spread_nibbles(mid2) << 4) | (tier >= 16 ? spread_nibbles(lo2) : 0x08080808u);
  const uint32_t h01 = __byte_perm(low, hi4, 0x5240), h23 = __byte_perm(low, hi4, 0x7361);
  const float2 f01 = __half22float2(*reinterpret_cast<const __half2*>(&h01));
  const float2 f23 = __half22float2(*reinterpret_cast<const __half2*>(&h23));
  out[0] = f01.x, out[1] = f01.y, out[2] = f23.x, out[3] = f23.y;
}

template <int D, int G>
__device__ __forceinline__ void fused(
    const __half* __restrict__ q, long long q_sb, long long q_sh, const int* __restrict__ lengths,
    const int* __restrict__ block_table, int blocks_per_seq, const uint8_t* __restrict__ k_hi,
    const uint8_t* __restrict__ k_mid, const uint8_t* __restrict__ k_lo,
    const uint8_t* __restrict__ k_exp, const uint8_t* __restrict__ v_hi,
    const uint8_t* __restrict__ v_mid, const uint8_t* __restrict__ v_lo,
    const uint8_t* __restrict__ v_exp, int num_kv_heads, float scale, int full_mode, int kt8,
    int kt12, int vt8, int vt12, int vskip, int vbias, int topk, int bpc,
    __half* __restrict__ out, unsigned long long* __restrict__ counters,
    uint8_t* __restrict__ k_tier_map, uint8_t* __restrict__ v_tier_map,
    float* __restrict__ dbg_scores, float* __restrict__ dbg_stats, float* __restrict__ dbg_o_est) {
  constexpr int SLAB = 2 * D * T;             // one block's hi + mid + lo bytes
  constexpr int CQ = D / 4, TG = kFusedThreads / CQ;   // values: channel quads x token groups
  constexpr int NB = kFusedMaxBlocks, MB = kFusedMaxBpc;
  static_assert(G <= kFusedWarps, "m and l: one warp per head");

  __shared__ float s_q[G][D];
  __shared__ uint8_t s_eq[G][D];
  __shared__ __align__(16) uint8_t s_kexp[MB][D];
  __shared__ __align__(16) uint8_t s_vexp[MB][D];
  __shared__ __align__(16) uint8_t s_ktier[MB][D];
  __shared__ int s_phys[NB];
  __shared__ int s_amax[MB][G];
  __shared__ __align__(16) float e_max[G][NB];     // the whole sequence's, gathered
  __shared__ float e_sum[G][NB];
  __shared__ int e_arg[G][NB];
  __shared__ int s_sel[G][NB];
  __shared__ float s_slot_p[G][NB];
  __shared__ float s_m[G], s_l[G];
  __shared__ short s_eo[G][D];                     // unbiased exponent of O_est
  __shared__ int s_r[MB][G];
  __shared__ int s_special[MB];
  __shared__ uint8_t s_vtier[MB * T];
  __shared__ float s_recv[G * D + 16];             // the cluster's partials of this CTA's
                                                   // output slice, [rank][slice element]
  extern __shared__ __align__(16) uint8_t akvf_smem[];
  // dynamic: [planes: max(bpc * SLAB, TG * G * D * 4)] [scores / weights: G * bpc * T
  // floats] [partials: max(16 * G * (T + 1), kFusedThreads) floats: the scores' four blocks
  // x four channel quarters, then O_est's]
  const int kv_bytes = max(bpc * SLAB, TG * G * D * 4);
  uint8_t* s_kv = akvf_smem;
  float* s_score = reinterpret_cast<float*>(akvf_smem + kv_bytes);   // [G][bpc * T]
  float* s_part = s_score + G * bpc * T;   // [warps][G][T], later [OP][G][D]
  const int stride = bpc * T;

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = (int)cluster.block_rank(), CL = (int)cluster.num_blocks();
  const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int Hq = num_kv_heads * G;
  const long long qhead = (long long)b * Hq + (long long)h * G;   // first query head

  AKVF_MARK(0)
  // every CTA of the cluster must have started before any writes into another's shared
  // memory (the first, after the scores): arrive now, wait there
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  // ---- round trip 1: length, block table row, q
  const int n = lengths[b];
  for (int j = tid; j < NB && j < blocks_per_seq; j += kFusedThreads)
    s_phys[j] = block_table[(long long)b * blocks_per_seq + j];
  for (int idx = tid; idx < G * D; idx += kFusedThreads) {
    const int g = idx / D, i = idx % D;
    const __half qh = q[b * q_sb + (qhead - (long long)b * Hq + g) * q_sh + i];
    s_q[g][i] = __half2float(qh);
    s_eq[g][i] = (uint8_t)max((__half_as_ushort(qh) >> 10) & 0x1F, 1);
  }
  const int nblk = (n + T - 1) / T;
  // the host sizes the launch from its mirror of the lengths; a longer sequence here (a
  // replayed graph whose lengths grew) would leave blocks unread: stop instead
  if (nblk > NB || nblk > CL * bpc) __trap();
  const int j0 = rank * bpc;
  const int cnt = max(0, min(bpc, nblk - j0));
  __syncthreads();

  AKVF_MARK(1)
  // ---- round trip 2: exponent maxima of the CTA's blocks, and every K hi row (read at
  //      every tier) into shared memory
  for (int idx = tid; idx < cnt * D / 16; idx += kFusedThreads) {
    const int jj = idx / (D / 16), c16 = idx % (D / 16);
    const long long head = (long long)s_phys[j0 + jj] * num_kv_heads + h;
    *reinterpret_cast<uint4*>(&s_kexp[jj][16 * c16]) =
        *reinterpret_cast<const uint4*>(k_exp + head * D + 16 * c16);
    *reinterpret_cast<uint4*>(&s_vexp[jj][16 * c16]) =
        *reinterpret_cast<const uint4*>(v_exp + head * D + 16 * c16);
  }
  for (int idx = tid; idx < cnt * D * T / 16; idx += kFusedThreads) {
    const int jj = idx / (D * T / 16), chunk = idx % (D * T / 16);
    const long long head = (long long)s_phys[j0 + jj] * num_kv_heads + h;
    cp_async16(s_kv + jj * SLAB + kperm(chunk >> 2) * T + 16 * (chunk & 3),
               k_hi + head * D * T + 16 * chunk);
  }
  __syncthreads();

  AKVF_MARK(2)
  // ---- K tiers (reference.k_tiers): a_g = max_i (E(q_gi) + ek_i) per (block, head);
  //      tier = the highest over the group's heads of tier(a_g - (E(q_gi) + ek_i))
  for (int pg = warp; pg < cnt * G; pg += kFusedWarps) {
    const int jj = pg / G, g = pg % G;
    int m = 0;
    for (int i = lane; i < D; i += 32) m = max(m, (int)s_eq[g][i] + (int)s_kexp[jj][i]);
    m = akv_warp_max_int(m);
    if (lane == 0) s_amax[jj][g] = m;
  }
  __syncthreads();
  int n12 = 0, n16 = 0;
  for (int idx = tid; idx < cnt * D; idx += kFusedThreads) {
    const int jj = idx / D, i = idx % D;
    const int ek = s_kexp[jj][i];
    int tier = 8;
    if (full_mode || ek == AKV_SPECIAL_EXPONENT) {
      tier = 16;
    } else {
#pragma unroll
      for (int g = 0; g < G; ++g)
        tier = max(tier, akv_tier_from_gap(s_amax[jj][g] - ((int)s_eq[g][i] + ek), kt8, kt12));
    }
    s_ktier[jj][i] = (uint8_t)tier;
    n12 += tier >= 12;
    n16 += tier >= 16;
    if (k_tier_map)
      k_tier_map[(((long long)b * num_kv_heads + h) * blocks_per_seq + j0 + jj) * D + i] = tier;
    // ---- round trip 3: the channel's mid / lo rows as its tier asks
    const long long row = ((long long)s_phys[j0 + jj] * num_kv_heads + h) * D + i;
    uint8_t* slab = s_kv + jj * SLAB;
    const int ip = kperm(i);
    if (tier >= 12) {
      cp_async16(slab + D * T + ip * (T / 2), k_mid + row * (T / 2));
      cp_async16(slab + D * T + ip * (T / 2) + 16, k_mid + row * (T / 2) + 16);
    }
    if (tier >= 16) {
      cp_async16(slab + D * T + D * (T / 2) + ip * (T / 2), k_lo + row * (T / 2));
      cp_async16(slab + D * T + D * (T / 2) + ip * (T / 2) + 16, k_lo + row * (T / 2) + 16);
    }
  }
  if (counters) {
    n12 = akv_warp_sum_int(n12);
    n16 = akv_warp_sum_int(n16);
    if (lane == 0 && (n12 | n16)) {
      atomicAdd(&counters[AKV_K_MID], (unsigned long long)(T / 2 * n12));
      atomicAdd(&counters[AKV_K_LO], (unsigned long long)(T / 2 * n16));
    }
    if (tid == 0 && cnt > 0) {
      atomicAdd(&counters[AKV_K_HI], (unsigned long long)(T * D * cnt));
      // K and V exponent maxima: D bytes each per block (as the scores and values kernels)
      atomicAdd(&counters[AKV_METADATA], (unsigned long long)(2 * D * cnt));
      atomicAdd(&counters[AKV_VALUES], (unsigned long long)((min(n, (j0 + cnt) * T) - j0 * T) * D));
    }
  }
  AKVF_MARK(3)
  cp_async_wait_all();
  __syncthreads();
  AKVF_MARK(4)

  // ---- scores on tensor cores, as version 7 (cuda/akv_decode_v7.cuh: its fragment mapping and
  //      akv7::kstep_mma): s[64 tokens, G] = K[64, D] . q^T[D, G], one mma.m16n8k16 per 16
  //      tokens x 16 channels for all heads of the group (fp16 operands are exact, fp32
  //      accumulation). Warp w takes block 4i + w / 4 and the channel quarter w % 4; lane
  //      (g8 = lane / 4, tq = lane % 4) holds tokens 8 g8 .. 8 g8 + 7 of channels
  //      cbase + 16 ks + {0..3}. The four quarters' sums meet in shared memory (rows of
  //      T + 1 floats, token t at column t + t / 32) and are added in quarter order.
  {
    constexpr int KSW = D / 64;                      // k-steps per warp
    constexpr int PROW = T + 1;
    const int wq = warp & 3, wb = warp >> 2;
    const int g8 = lane >> 2, tq = lane & 3;
    const int cbase = wq * (D / 4) + 4 * tq;
    uint32_t bq[KSW][2];
#pragma unroll
    for (int ks = 0; ks < KSW; ++ks)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t v = 0u;
        if (g8 < G) {
          const int c = cbase + 16 * ks + 2 * r;
          const __half2 h2 = __floats2half2_rn(s_q[g8][c], s_q[g8][c + 1]);   // exact: q is fp16
          v = *reinterpret_cast<const uint32_t*>(&h2);
        }
        bq[ks][r] = v;
      }
    for (int j4 = 0; j4 < cnt; j4 += 4) {
      const int jj = j4 + wb;
      if (jj < cnt) {
        const uint8_t* slab = s_kv + jj * SLAB;
        float acc[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSW; ++ks) {
          const int c0 = cbase + 16 * ks;
          const uint32_t t4 = *reinterpret_cast<const uint32_t*>(&s_ktier[jj][c0]);
          uint2 hi[4];
          uint32_t mid[4], lo[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {   // logical channel c0 + i, stored at kperm(c0 + i)
            const int c = kperm(c0 + i);
            hi[i] = *reinterpret_cast<const uint2*>(slab + c * T + 8 * g8);
            uint2 m = make_uint2(*reinterpret_cast<const uint32_t*>(slab + D * T + c * (T / 2) + 4 * g8), 0u);
            uint2 l = make_uint2(
                *reinterpret_cast<const uint32_t*>(slab + D * T + D * (T / 2) + c * (T / 2) + 4 * g8), 0u);
            akv2::tier_words((t4 >> (8 * i)) & 0xFF, m, l);
            mid[i] = m.x;
            lo[i] = l.x;
          }
          akv7::kstep_mma(acc, hi, mid, lo, bq[ks][0], bq[ks][1]);
        }
        // heads 2tq, 2tq + 1 of tokens 8 g8 + 2 mt (+ 1)
        float* const sp = s_part + ((wb * 4 + wq) * G) * PROW + 8 * g8 + (g8 >> 2);
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (2 * tq + e < G)
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
              sp[(2 * tq + e) * PROW + 2 * mt] = acc[mt][e];
              sp[(2 * tq + e) * PROW + 2 * mt + 1] = acc[mt][2 + e];
            }
      }
      __syncthreads();
      for (int idx = tid; idx < 4 * G * T; idx += kFusedThreads) {
        const int hb = idx / (G * T), g = (idx / T) % G, t = idx % T;
        const int jb = j4 + hb;
        if (jb >= cnt) continue;
        const float* pp = s_part + (hb * 4 * G + g) * PROW + t + (t >> 5);
        float s = ((pp[0] + pp[G * PROW]) + pp[2 * G * PROW]) + pp[3 * G * PROW];
        s *= scale;
        const int tok = (j0 + jb) * T + t;
        const bool valid = tok < n;
        s_score[g * stride + jb * T + t] = valid ? s : -INFINITY;
        if (dbg_scores && valid)
          dbg_scores[(qhead + g) * ((long long)blocks_per_seq * T) + tok] = s;
      }
      __syncthreads();
    }
  }
  AKVF_MARK(5)
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  // block statistics (akv_block_stats2's: max, first arg-max, sum of exp(s - max)), written
  // by lane r into CTA r's copy of the sequence's statistics (e_max, e_sum, e_arg)
  for (int pg = warp; pg < cnt * G; pg += kFusedWarps) {
    const int jj = pg / G, g = pg % G;
    const float s0 = s_score[g * stride + jj * T + lane], s1 = s_score[g * stride + jj * T + lane + 32];
    const float m = akv_warp_max(fmaxf(s0, s1));
    int arg = s0 == m ? lane : (s1 == m ? lane + 32 : T);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) arg = min(arg, __shfl_xor_sync(0xffffffffu, arg, o));
    float e = (s0 == -INFINITY ? 0.f : expf(s0 - m)) + (s1 == -INFINITY ? 0.f : expf(s1 - m));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
    if (lane < CL) {
      const int j = j0 + jj;
      *cluster.map_shared_rank(&e_max[g][j], lane) = m;
      *cluster.map_shared_rank(&e_sum[g][j], lane) = e;
      *cluster.map_shared_rank(&e_arg[g][j], lane) = j * T + (arg < T ? arg : 0);
    }
  }
  AKVF_MARK(6)
  cluster.sync();   // 1: every CTA's block statistics are visible cluster-wide
  AKVF_MARK(7)

  // ---- the estimate (every CTA, the same bits) from the sequence's statistics
  const int k = min(topk, nblk);
  for (int idx = tid; idx < G * k; idx += kFusedThreads) s_sel[idx / k][idx % k] = 0;
  __syncthreads();
  AKVF_MARK(18)
  // m and l: warp g, lane L holds blocks L and L + 32; fixed shuffle order
  if (warp < G) {
    const int g = warp;
    const float v0 = lane < nblk ? e_max[g][lane] : -INFINITY;
    const float v1 = lane + 32 < nblk ? e_max[g][lane + 32] : -INFINITY;
    const float m = akv_warp_max(fmaxf(v0, v1));
    float l = (v0 == -INFINITY ? 0.f : e_sum[g][lane] * expf(v0 - m)) +
              (v1 == -INFINITY ? 0.f : e_sum[g][lane + 32] * expf(v1 - m));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      s_m[g] = m;
      s_l[g] = l;
      if (dbg_stats && rank == 0) {
        dbg_stats[(qhead + g) * 2 + 0] = m;
        dbg_stats[(qhead + g) * 2 + 1] = l;
      }
    }
  }
  AKVF_MARK(21)
  // ranks in (maximum desc, block asc) order; rank r < k is slot r (reference.estimate_blocks)
  // TPI adjacent threads per (head, block), each comparing a share of the blocks
  {
    constexpr int TPI = G == 1 ? 8 : (G == 2 ? 4 : (G <= 4 ? 2 : 1));
    const int sub = tid % TPI;
    const float4* rows = reinterpret_cast<const float4*>(&e_max[0][0]);
    for (int i0 = tid / TPI; i0 < ((G * nblk + 31) / 32) * 32; i0 += kFusedThreads / TPI) {
      const bool item = i0 < G * nblk;
      const int g = item ? i0 / nblk : 0, j = item ? i0 % nblk : 0;
      const float v = e_max[g][j];
      int r = 0;
#pragma unroll 4
      for (int i4 = sub; i4 < (nblk + 3) / 4; i4 += TPI) {
        const float4 u = rows[g * (NB / 4) + i4];
        const int i = 4 * i4;
        r += ((u.x > v) || (u.x == v && i < j));
        r += i + 1 < nblk && ((u.y > v) || (u.y == v && i + 1 < j));
        r += i + 2 < nblk && ((u.z > v) || (u.z == v && i + 2 < j));
        r += i + 3 < nblk && ((u.w > v) || (u.w == v && i + 3 < j));
      }
#pragma unroll
      for (int o = 1; o < TPI; o <<= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
      if (item && sub == 0 && r < k) s_sel[g][r] = j;
    }
  }
  __syncthreads();
  AKVF_MARK(19)
  for (int idx = tid; idx < G * k; idx += kFusedThreads) {
    const int g = idx / k, r = idx % k;
    s_slot_p[g][r] = expf(e_max[g][s_sel[g][r]] - s_m[g]) / s_l[g];
  }
  __syncthreads();
  AKVF_MARK(8)
  // O_est, spread over the cluster: CTA r computes outputs e = (g, d) in
  // [r * per, (r + 1) * per) of the G * D; thread (part, e) sums slots part, part + parts,
  // ... (8 rows in flight), the parts are added in part order, and after a cluster barrier
  // every CTA reads the exponents it needs from the owners' shared memory.
  {
    const int per = (G * D + CL - 1) / CL, parts = kFusedThreads / per;
    const int part = tid / per, e = rank * per + tid % per;
    float acc = 0.f;
    if (part < parts && e < G * D) {
      const int g = e / D, d = e % D;
      for (int r0 = part; r0 < k; r0 += 8 * parts) {
        uint32_t w[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int r = r0 + u * parts;
          w[u] = 0u;
          if (r < k) {
            const int j = s_sel[g][r];
            const long long row =
                (((long long)s_phys[j] * num_kv_heads + h) * T + e_arg[g][j] % T) * D;
            w[u] = v_hi[row + d];
          }
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int r = r0 + u * parts;
          if (r >= k) break;
          acc += s_slot_p[g][r] * fabsf(akv_bits_to_float(akv_join_bits(w[u], 0, 0, 8)));
        }
      }
    }
    if (part < parts) s_part[part * per + tid % per] = acc;
    __syncthreads();
    // thread (r, i): element i of the slice, its exponent into CTA r's s_eo
    for (int idx = tid; idx < per * CL; idx += kFusedThreads) {
      const int i = idx % per, r = idx / per, e2 = rank * per + i;
      if (e2 >= G * D) continue;
      float o = 0.f;
      for (int p = 0; p < parts; ++p) o += s_part[p * per + i];
      *cluster.map_shared_rank(&s_eo[e2 / D][e2 % D], r) = (short)akv_unbiased_exp32(o);
      if (dbg_o_est && r == 0) dbg_o_est[qhead * D + e2] = o;
    }
    AKVF_MARK(9)
    cluster.sync();   // 2: O_est's exponents are complete in every CTA
    AKVF_MARK(10)
  }
  if (counters && rank == 0 && tid == 0)
    atomicAdd(&counters[AKV_METADATA], (unsigned long long)(G * k * D));
  __syncthreads();

  AKVF_MARK(11)
  // ---- V tiers. r_g = min_d (e(O_est_gd) - e(v_exp_max_d)) + bias per (block, head);
  //      a block whose V holds Inf/NaN is read at 16 bits (reference.v_tiers)
  for (int pg = warp; pg < cnt * G; pg += kFusedWarps) {
    const int jj = pg / G, g = pg % G;
    int r = 0x7fffffff, special = 0;
    for (int d = lane; d < D; d += 32) {
      const int ev = s_vexp[jj][d];
      special |= ev == AKV_SPECIAL_EXPONENT;
      r = min(r, (int)s_eo[g][d] - ((ev < 1 ? 1 : ev) - 15));
    }
    r = akv_warp_min_int(r);
    special = __any_sync(0xffffffffu, special);
    if (lane == 0) {
      s_r[jj][g] = r + vbias;
      if (g == 0) s_special[jj] = special;
    }
  }
  __syncthreads();
  AKVF_MARK(20)
  // per token: the weights, the tier, and at once the copies of its V rows at that tier
  // (round trip 4; the K planes are done). Slab layout per block: hi [T][D], mid [T][D/2],
  // lo [T][D/2]. p = 2^((s - m) log2 e) / l, as the four launches' values kernels.
  const int skip = vskip + akv_skip_budget(n);
  {
    // TPT adjacent threads per token (up to 256 tokens): heads and row copies are shared
    // out among them, the tier is their maximum
    const int TPT = cnt * T <= kFusedThreads / 2 ? 2 : 1;
    const int sub = tid % TPT;
    for (int t0 = tid / TPT; t0 < ((cnt * T * TPT + 31) / 32) * 32 / TPT; t0 += kFusedThreads / TPT) {
      const bool item = t0 < cnt * T;
      const int t = item ? t0 : 0;
      const int jj = t / T, tt = t % T, tok = j0 * T + t;
      const bool valid = item && tok < n;
      int tier = 0;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g % TPT != sub) continue;
        float p = 0.f;
        if (valid) p = exp2f((s_score[g * stride + t] - s_m[g]) * 1.44269504088896340736f) / s_l[g];
        if (item) s_score[g * stride + t] = p;   // the weight replaces the score
        tier = max(tier, akv_v_tier_from_gap(s_r[jj][g] - akv_unbiased_exp32(p), skip, vt8, vt12));
      }
      if (TPT == 2) tier = max(tier, __shfl_xor_sync(0xffffffffu, tier, 1));
      if (full_mode || s_special[jj]) tier = 16;
      tier = valid ? tier : 0;
      if (item && sub == 0) {
        s_vtier[t] = (uint8_t)tier;
        if (v_tier_map && valid)
          v_tier_map[((long long)b * num_kv_heads + h) * ((long long)blocks_per_seq * T) + tok] = tier;
      }
      if (!item) continue;
      const long long row = ((long long)s_phys[j0 + jj] * num_kv_heads + h) * T + tt;
      uint8_t* slab = s_kv + jj * SLAB;
      if (tier > 0) {
#pragma unroll
        for (int c = 0; c < D / 16; c += 2)
          cp_async16(slab + tt * D + 16 * (c + sub), v_hi + row * D + 16 * (c + sub));
      }
      if (tier >= 12) {
#pragma unroll
        for (int c = 0; c < D / 32; c += 2)
          cp_async16(slab + D * T + tt * (D / 2) + 16 * (c + sub), v_mid + row * (D / 2) + 16 * (c + sub));
      }
      if (tier >= 16) {
#pragma unroll
        for (int c = 0; c < D / 32; c += 2)
          cp_async16(slab + D * T + T * (D / 2) + tt * (D / 2) + 16 * (c + sub),
                     v_lo + row * (D / 2) + 16 * (c + sub));
      }
      if (TPT == 1) {     // one thread per token: the other half of the chunks as well
        if (tier > 0) {
#pragma unroll
          for (int c = 1; c < D / 16; c += 2)
            cp_async16(slab + tt * D + 16 * c, v_hi + row * D + 16 * c);
        }
        if (tier >= 12) {
#pragma unroll
          for (int c = 1; c < D / 32; c += 2)
            cp_async16(slab + D * T + tt * (D / 2) + 16 * c, v_mid + row * (D / 2) + 16 * c);
        }
        if (tier >= 16) {
#pragma unroll
          for (int c = 1; c < D / 32; c += 2)
            cp_async16(slab + D * T + T * (D / 2) + tt * (D / 2) + 16 * c, v_lo + row * (D / 2) + 16 * c);
        }
      }
    }
  }
  AKVF_MARK(12)
  if (counters) {
    __syncthreads();
    int c8 = 0, c12 = 0, c16 = 0;
    for (int t = tid; t < cnt * T; t += kFusedThreads) {
      const int tier = s_vtier[t];
      c8 += tier > 0;
      c12 += tier >= 12;
      c16 += tier >= 16;
    }
    c8 = akv_warp_sum_int(c8);
    c12 = akv_warp_sum_int(c12);
    c16 = akv_warp_sum_int(c16);
    if (lane == 0 && c8) {
      atomicAdd(&counters[AKV_V_HI], (unsigned long long)(c8 * D));
      atomicAdd(&counters[AKV_V_MID], (unsigned long long)(c12 * D / 2));
      atomicAdd(&counters[AKV_V_LO], (unsigned long long)(c16 * D / 2));
    }
  }
  cp_async_wait_all();
  __syncthreads();
  AKVF_MARK(13)
  // ---- partial output: thread (cq, tg) sums tokens tg, tg + TG, ... of channels 4cq..4cq+3
  {
    const int cq = tid % CQ, tg = tid / CQ;
    float acc[G][4];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[g][c] = 0.f;
    for (int t = tg; t < cnt * T; t += TG) {
      const int tier = s_vtier[t];
      if (tier == 0) continue;
      const int jj = t / T, tt = t % T;
      const uint8_t* slab = s_kv + jj * SLAB;
      const uint32_t hi4 = *reinterpret_cast<const uint32_t*>(slab + tt * D + 4 * cq);
      const uint32_t mid2 =
          *reinterpret_cast<const unsigned short*>(slab + D * T + tt * (D / 2) + 2 * cq);
      const uint32_t lo2 = *reinterpret_cast<const unsigned short*>(slab + D * T + T * (D / 2) +
                                                                     tt * (D / 2) + 2 * cq);
      float vv[4];
      join4_fast(hi4, mid2, lo2, tier, vv);   // rows not read by the tier are ignored
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float p = s_score[g * stride + t];
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[g][c] = fmaf(p, vv[c], acc[g][c]);
      }
    }
    __syncthreads();   // every thread is done with the V planes: s_kv becomes the reduction
    float* s_red = reinterpret_cast<float*>(s_kv);   // [TG][G][D]
#pragma unroll
    for (int g = 0; g < G; ++g)
      *reinterpret_cast<float4*>(&s_red[(tg * G + g) * D + 4 * cq]) =
          make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    __syncthreads();
    // element idx of this CTA's partial goes to its slice's owner (idx / per), row `rank`
    const int per = (G * D + CL - 1) / CL;
    for (int idx = tid; idx < G * D; idx += kFusedThreads) {
      float o = 0.f;
#pragma unroll
      for (int c = 0; c < TG; ++c) o += s_red[c * G * D + idx];
      *cluster.map_shared_rank(&s_recv[rank * per + idx % per], idx / per) = o;
    }
  }
  AKVF_MARK(14)
  cluster.sync();   // 3: every partial of this CTA's slice has arrived
  AKVF_MARK(15)
  // ---- CTA `rank` writes its slice of the G * D outputs, the partials summed in rank order.
  //      No CTA reads another's shared memory from here on, so no barrier before leaving.
  {
    const int per = (G * D + CL - 1) / CL;
    for (int i = tid; i < per && rank * per + i < G * D; i += kFusedThreads) {
      float o = 0.f;
      for (int r = 0; r < CL; ++r) o += s_recv[r * per + i];
      const int idx = rank * per + i;
      out[(qhead + idx / D) * D + idx % D] = __float2half_rn(o);
    }
  }
  AKVF_MARK(16)
  AKVF_MARK(17)
}
}  // namespace akvf
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define AKVF_BODY(D, G)                                                                      \
  akvf::fused<D, G>(q, q_sb, q_sh, lengths, block_table, blocks_per_seq, k_hi, k_mid, k_lo,  \
                    k_exp, v_hi, v_mid, v_lo, v_exp, num_kv_heads, scale, full_mode, kt8,    \
                    kt12, vt8, vt12, vskip, vbias, topk, bpc, out, counters, k_tier_map,     \
                    v_tier_map, dbg_scores, dbg_stats, dbg_o_est);
#else
#define AKVF_BODY(D, G) __trap();   // the host launches these on compute capability >= 9.0 only
#endif

#define AKVF_ENTRY(D, G)                                                                     \
  extern "C" __global__ void __launch_bounds__(kFusedThreads, 2) akv_decode_fused_d##D##_g##G(  \
      const __half* q, long long q_sb, long long q_sh, const int* lengths,                  \
      const int* block_table, int blocks_per_seq, const uint8_t* k_hi, const uint8_t* k_mid, \
      const uint8_t* k_lo, const uint8_t* k_exp, const uint8_t* v_hi, const uint8_t* v_mid,  \
      const uint8_t* v_lo, const uint8_t* v_exp, int num_kv_heads, float scale,             \
      int full_mode, int kt8, int kt12, int vt8, int vt12, int vskip, int vbias, int topk,  \
      int bpc, __half* out, unsigned long long* counters, uint8_t* k_tier_map,             \
      uint8_t* v_tier_map, float* dbg_scores, float* dbg_stats, float* dbg_o_est) {          \
    AKVF_BODY(D, G)                                                                          \
  }
AKVF_ENTRY(64, 1)
AKVF_ENTRY(64, 2)
AKVF_ENTRY(64, 3)
AKVF_ENTRY(64, 4)
AKVF_ENTRY(64, 5)
AKVF_ENTRY(64, 6)
AKVF_ENTRY(64, 7)
AKVF_ENTRY(64, 8)
AKVF_ENTRY(128, 1)
AKVF_ENTRY(128, 2)
AKVF_ENTRY(128, 3)
AKVF_ENTRY(128, 4)
AKVF_ENTRY(128, 5)
AKVF_ENTRY(128, 6)
AKVF_ENTRY(128, 7)
AKVF_ENTRY(128, 8)
