// akv kernels: append into bit planes, and split-KV precision-aligned decode attention.
//
// Layout (akv_runtime/layout.py, DESIGN.md section 3), per layer, T = 64 tokens per block:
//   k_hi [blocks, Hk, D, T]   k_mid/k_lo [blocks, Hk, D, T/2]   (token 2p low nibble of byte p)
//   v_hi [blocks, Hk, T, D]   v_mid/v_lo [blocks, Hk, T, D/2]   (channel 2c low nibble of c)
//   k_exp_max / v_exp_max [blocks, Hk, D]                        (uint8 fp16 exponent fields)
// Sequence b's logical block j lives in physical block block_table[b * blocks_per_seq + j].
//
// Decode attention (DESIGN.md sections 4-5) is four launches on the caller's stream:
//   akv_decode_scores_d{64,128}   K planes at their tiers -> fp32 scores, per-block stats
//   akv_decode_estimate           global max/sum, top-k V output estimate O_est
//   akv_decode_values_d{64,128}   V tiers per token, per-block partial outputs (normalised)
//   akv_decode_combine            sum of the partials -> fp16 output
// or, on the V-whole path (V at 16 bits, no V rule; docs/design.md), two:
// akv_decode_flash_whole_v7_* (one pass over a split: each block's scores straight into its
// p·V by an online softmax; akv_decode_v7.cuh; the default) or akv_decode_split_whole_v7_*
// (a split's scores, then its values normalised by the split's own softmax statistics, in
// one CTA), then akv_decode_combine_rescale (the flash-decoding merge of the splits); or
// three, the version's scores kernel and akv_decode_values_whole_* in place of the one-CTA
// kernel ($AKV_WHOLE_KERNEL=three).
// Each has its numpy twin in akv_runtime/reference.py (decode_attention).
#include "akv_planes.cuh"

// ----------------------------------------------------------------------------- append
// akv_append: write `num_new` new tokens of every sequence into the planes of one layer, and
// advance lengths[b] by num_new.
// grid (touched blocks per sequence = ceil(num_new/64) + 1, Hk, B); block (D) threads.
// CTA (j, h, b) owns logical block first_block(b) + j of KV head h, so every byte it writes
// (including nibble bytes shared by two tokens) is written by exactly one thread.
// Thread d: K channel d (hi bytes, nibble pairs, exponent max); V channel d (hi byte,
// exponent max) and, for d < D/2, V nibble byte d of every new token.
// Inputs k, v: fp16 [B, Hk, S, D] with element strides (sb, sh, ss) and d contiguous.
// lengths[b]: tokens before this append. Every CTA of sequence b reads it, then counts itself
// in arrive[b] (int32, zero between launches); the last CTA of b to arrive, when no CTA of b
// can still read it, writes lengths[b] + num_new and sets arrive[b] back to zero (the "last
// block" pattern of the CUDA threadFenceReduction sample). One launch per append, not two:
// a decode token's append was two launches of ~1.7 us each (docs/perf-notes.md).
extern "C" __global__ void akv_append(
    const __half* __restrict__ k, const __half* __restrict__ v,
    long long k_sb, long long k_sh, long long k_ss, long long v_sb, long long v_sh,
    long long v_ss, int num_new, int* __restrict__ lengths, int* __restrict__ arrive,
    const int* __restrict__ block_table, int blocks_per_seq, uint8_t* __restrict__ k_hi,
    uint8_t* __restrict__ k_mid, uint8_t* __restrict__ k_lo, uint8_t* __restrict__ v_hi,
    uint8_t* __restrict__ v_mid, uint8_t* __restrict__ v_lo, uint8_t* __restrict__ k_exp,
    uint8_t* __restrict__ v_exp, int num_kv_heads, int head_dim) {
  const int b = blockIdx.z, h = blockIdx.y, d = threadIdx.x, D = head_dim;
  const int start = lengths[b];
  const int blk = start / AKV_BLOCK_TOKENS + blockIdx.x;
  const int lo_tok = max(start, blk * AKV_BLOCK_TOKENS);
  const int hi_tok = min(start + num_new, (blk + 1) * AKV_BLOCK_TOKENS);
  if (lo_tok < hi_tok && d < D) {
    const int phys = block_table[(long long)b * blocks_per_seq + blk];
    const long long head = (long long)phys * num_kv_heads + h;
    const int off0 = lo_tok - blk * AKV_BLOCK_TOKENS, off1 = hi_tok - blk * AKV_BLOCK_TOKENS;
    const unsigned short* kb = reinterpret_cast<const unsigned short*>(k) + b * k_sb + h * k_sh;
    const unsigned short* vb = reinterpret_cast<const unsigned short*>(v) + b * v_sb + h * v_sh;
    // K, channel d: hi bytes and exponent max
    uint8_t* khi = k_hi + (head * D + d) * AKV_BLOCK_TOKENS;
    int emax = 0;
    for (int off = off0; off < off1; ++off) {
      const uint32_t bits = kb[(long long)(blk * AKV_BLOCK_TOKENS + off - start) * k_ss + d];
      khi[off] = bits >> 8;
      emax = max(emax, akv_exp_field_hi(bits >> 8));
    }
    uint8_t* kexp = k_exp + head * D + d;
    *kexp = (uint8_t)max(off0 == 0 ? 0 : (int)*kexp, emax);
    // K nibble bytes: token pair (2p, 2p+1); keep the neighbour's nibble when it is not new
    uint8_t* kmid = k_mid + (head * D + d) * (AKV_BLOCK_TOKENS / 2);
    uint8_t* klo = k_lo + (head * D + d) * (AKV_BLOCK_TOKENS / 2);
    for (int p = off0 / 2; p <= (off1 - 1) / 2; ++p) {
      uint32_t mid = kmid[p], lo = klo[p];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int off = 2 * p + half;
        if (off < off0 || off >= off1) continue;
        const uint32_t bits = kb[(long long)(blk * AKV_BLOCK_TOKENS + off - start) * k_ss + d];
        const int shift = 4 * half;
        mid = (mid & ~(0xFu << shift)) | (((bits >> 4) & 0xF) << shift);
        lo = (lo & ~(0xFu << shift)) | ((bits & 0xF) << shift);
      }
      kmid[p] = mid;
      klo[p] = lo;
    }

    // V, channel d: hi bytes and exponent max; channel pair d (< D/2): nibble bytes
    uint8_t* vhi = v_hi + head * AKV_BLOCK_TOKENS * D;
    uint8_t* vmid = v_mid + head * AKV_BLOCK_TOKENS * (D / 2);
    uint8_t* vlo = v_lo + head * AKV_BLOCK_TOKENS * (D / 2);
    emax = 0;
    for (int off = off0; off < off1; ++off) {
      const unsigned short* row = vb + (long long)(blk * AKV_BLOCK_TOKENS + off - start) * v_ss;
      const uint32_t bits = row[d];
      vhi[off * D + d] = bits >> 8;
      emax = max(emax, akv_exp_field_hi(bits >> 8));
      if (d < D / 2) {
        const uint32_t e = row[2 * d], o = row[2 * d + 1];
        vmid[off * (D / 2) + d] = ((e >> 4) & 0xF) | (((o >> 4) & 0xF) << 4);
        vlo[off * (D / 2) + d] = (e & 0xF) | ((o & 0xF) << 4);
      }
    }
    uint8_t* vexp = v_exp + head * D + d;
    *vexp = (uint8_t)max(off0 == 0 ? 0 : (int)*vexp, emax);
  }
  // every thread of this CTA has read lengths[b]: now the CTA counts itself
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&arrive[b], 1) == gridDim.x * gridDim.y - 1) {
      lengths[b] = start + num_new;
      arrive[b] = 0;
    }
  }
}

// ---------------------------------------------------------------------- decode: scores
// akv_decode_scores<D>: grid (max blocks over the batch, Hk, B); block 128 threads.
// CTA (j, h, b) serves the G query heads of KV head h (one GQA group) on logical block j, so
// K bytes are read once per group. Steps:
//  1. q of the group -> shared memory (fp32) with exponent fields E(q).
//  2. K tiers per channel i (reference.k_tiers): a_gi = E(q_gi) + k_exp_max[i],
//     gap = max_i a_gi - a_gi, tier by thresholds, max over the group; exponent 31 -> 16.
//  3. Thread (tq = tid % 16, cg = tid / 16): tokens 4tq..4tq+3 of channels cg*D/8 ...; reads
//     4 hi bytes + 2 mid + 2 lo bytes per channel as its tier asks; fp32 partial dots.
//  4. Partial dots summed over the 8 channel groups in order; scores * scale -> scores[].
//  5. Per query head: block max, arg max (lowest token) and sum exp(s - max).
constexpr int kScoreThreads = 128;

template <int D>
__device__ __forceinline__ void decode_scores(
    const __half* __restrict__ q, long long q_sb, long long q_sh,
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ k_hi, const uint8_t* __restrict__ k_mid,
    const uint8_t* __restrict__ k_lo, const uint8_t* __restrict__ k_exp, int num_kv_heads,
    int group, float scale, int full_mode, int t8, int t12, float* __restrict__ scores,
    float* __restrict__ block_max, float* __restrict__ block_sum, int* __restrict__ block_arg,
    unsigned long long* __restrict__ counters, uint8_t* __restrict__ k_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, CG = 8, CPG = D / CG;
  __shared__ float s_q[AKV_MAX_GROUP][D];
  __shared__ int s_a[AKV_MAX_GROUP][D];
  __shared__ int s_amax[AKV_MAX_GROUP];
  __shared__ int s_tier[D];
  __shared__ float s_red[CG][AKV_MAX_GROUP][T];
  __shared__ float s_score[AKV_MAX_GROUP][T];

  const int b = blockIdx.z, h = blockIdx.y, blk = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  if (blk * T >= n) return;
  const int phys = block_table[(long long)b * blocks_per_seq + blk];
  const long long head = (long long)phys * num_kv_heads + h;
  const uint8_t* kexp = k_exp + head * D;
  const int num_q_heads = num_kv_heads * group;

  // 1-2. q and the K tiers of this block
  for (int i = tid; i < D; i += kScoreThreads) {
    const int ek = kexp[i];
    for (int g = 0; g < group; ++g) {
      const __half qh = q[b * q_sb + (long long)(h * group + g) * q_sh + i];
      s_q[g][i] = __half2float(qh);
      const int eq = max((__half_as_ushort(qh) >> 10) & 0x1F, 1);
      s_a[g][i] = eq + ek;
    }
  }
  __syncthreads();
  for (int g = warp; g < group; g += kScoreThreads / 32) {
    int m = 0;
    for (int i = lane; i < D; i += 32) m = max(m, s_a[g][i]);
    m = akv_warp_max_int(m);
    if (lane == 0) s_amax[g] = m;
  }
  __syncthreads();
  for (int i = tid; i < D; i += kScoreThreads) {
    int tier = 8;
    if (full_mode || kexp[i] == AKV_SPECIAL_EXPONENT) {
      tier = 16;
    } else {
      for (int g = 0; g < group; ++g)
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

  // 3. partial dot products
  const int tq = tid % 16, cg = tid / 16;
  float acc[AKV_MAX_GROUP][4];
#pragma unroll
  for (int g = 0; g < AKV_MAX_GROUP; ++g)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[g][k] = 0.f;
#pragma unroll 4
  for (int ii = 0; ii < CPG; ++ii) {
    const int i = cg * CPG + ii;
    const int tier = s_tier[i];
    const long long row = head * D + i;
    const uint32_t hi4 = *reinterpret_cast<const uint32_t*>(k_hi + row * T + 4 * tq);
    uint32_t mid2 = 0, lo2 = 0;
    if (tier >= 12)
      mid2 = *reinterpret_cast<const unsigned short*>(k_mid + row * (T / 2) + 2 * tq);
    if (tier >= 16)
      lo2 = *reinterpret_cast<const unsigned short*>(k_lo + row * (T / 2) + 2 * tq);
    float kv[4];
    akv_join4(hi4, mid2, lo2, tier, kv);
#pragma unroll
    for (int g = 0; g < AKV_MAX_GROUP; ++g) {
      if (g < group) {
        const float qv = s_q[g][i];
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[g][k] = fmaf(qv, kv[k], acc[g][k]);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < AKV_MAX_GROUP; ++g)
    if (g < group)
#pragma unroll
      for (int k = 0; k < 4; ++k) s_red[cg][g][4 * tq + k] = acc[g][k];
  __syncthreads();

  // 4. reduce over channel groups, scale, store
  for (int idx = tid; idx < group * T; idx += kScoreThreads) {
    const int g = idx / T, t = idx % T;
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < CG; ++c) s += s_red[c][g][t];
    s *= scale;
    const int tok = blk * T + t;
    const bool valid = tok < n;
    s_score[g][t] = valid ? s : -INFINITY;
    if (valid)
      scores[((long long)b * num_q_heads + h * group + g) * ((long long)blocks_per_seq * T) + tok] = s;
  }
  __syncthreads();

  // 5. per-head block statistics (one warp per head)
  for (int g = warp; g < group; g += kScoreThreads / 32) {
    const long long at = ((long long)b * num_q_heads + h * group + g) * blocks_per_seq + blk;
    akv_block_stats(s_score[g], lane, blk, at, block_max, block_sum, block_arg);
  }
}

#define AKV_SCORES_ENTRY(D)                                                                  \
  extern "C" __global__ void __launch_bounds__(kScoreThreads) akv_decode_scores_d##D(       \
      const __half* q, long long q_sb, long long q_sh, const int* lengths,                   \
      const int* block_table, int blocks_per_seq, const uint8_t* k_hi, const uint8_t* k_mid, \
      const uint8_t* k_lo, const uint8_t* k_exp, int num_kv_heads, int group, float scale,   \
      int full_mode, int t8, int t12, float* scores, float* block_max, float* block_sum,     \
      int* block_arg, unsigned long long* counters, uint8_t* k_tier_map) {                   \
    decode_scores<D>(q, q_sb, q_sh, lengths, block_table, blocks_per_seq, k_hi, k_mid, k_lo, \
                     k_exp, num_kv_heads, group, scale, full_mode, t8, t12, scores,          \
                     block_max, block_sum, block_arg, counters, k_tier_map);                 \
  }
AKV_SCORES_ENTRY(64)
AKV_SCORES_ENTRY(128)

// -------------------------------------------------------------------- decode: estimate
// akv_decode_estimate: grid (Hq, B); block 256 threads. For one query head:
//  1. m = max of the block maxima, l = sum_j block_sum_j * exp(block_max_j - m), in one pass
//     (online rescaling, then a fixed merge order over lanes and warps).
//  2. The approximate top-k: the `topk` blocks with the largest block maximum (ties to the
//     lower block, reference.estimate_blocks). A radix select finds the k-th largest maximum;
//     each block at or above it counts its rank (how many blocks come before it in that
//     order) in parallel; rank r < topk is selection slot r.
//  3. O_est[d] = sum over the slots in order of p_j * |v_jd at tier 8| for the slot's arg-max
//     token j, p_j = exp(s_j - m) / l. The rows' addresses are resolved first; then all
//     threads stage the rows' hi bytes in shared memory at once (16 bytes each, 4 KB per
//     pass), and thread d sums channel d in slot order.
constexpr int kEstimateThreads = 256;
constexpr int kEstimateSmemBlocks = 4096;   // block maxima kept on chip up to 256k tokens
constexpr int kMaxTopk = 1024;
constexpr int kEstimateSelectAbove = 64;    // blocks; below this every block is a candidate
constexpr int kEstimateRowBytes = 16 * kEstimateThreads;  // V hi rows staged per pass
static_assert(kEstimateThreads == 256, "the radix select's histogram: one bin per thread");

extern "C" __global__ void __launch_bounds__(kEstimateThreads) akv_decode_estimate(
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ v_hi, int num_kv_heads, int group, int head_dim, int topk,
    const float* __restrict__ block_max, const float* __restrict__ block_sum,
    const int* __restrict__ block_arg, float* __restrict__ stats, float* __restrict__ o_est,
    unsigned long long* __restrict__ counters) {
  __shared__ float s_bmax[kEstimateSmemBlocks];
  __shared__ float s_fred[kEstimateThreads / 32], s_lred[kEstimateThreads / 32];
  __shared__ int s_sel[kMaxTopk];
  __shared__ float s_p[kMaxTopk];
  __shared__ long long s_row[kMaxTopk];
  __shared__ float s_m, s_l;
  __shared__ int s_hist[kEstimateThreads];
  __shared__ int s_digit, s_above;
  __shared__ int s_cand[kMaxTopk];
  __shared__ int s_ncand;
  __shared__ __align__(16) uint8_t s_vrow[kEstimateRowBytes];
  const int hq = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5, num_warps = kEstimateThreads / 32;
  const int num_q_heads = num_kv_heads * group, D = head_dim;
  const long long row = ((long long)b * num_q_heads + hq) * blocks_per_seq;
  // the first statistics are requested together with the length (a row holds blocks_per_seq
  // entries; those past the sequence's blocks are loaded and ignored): one round trip less
  float v0 = -INFINITY, e0 = 0.f;
  if (tid < blocks_per_seq) {
    v0 = block_max[row + tid];
    e0 = block_sum[row + tid];
  }
  const int nblk = (lengths[b] + AKV_BLOCK_TOKENS - 1) / AKV_BLOCK_TOKENS;
  const bool on_chip = nblk <= kEstimateSmemBlocks;
  const float* bmax = on_chip ? s_bmax : block_max + row;

  // 1. global max and sum in one pass over the block statistics: each thread keeps a running
  //    (max, sum) rescaled as its max grows (online softmax), then the pairs merge across
  //    lanes and warps. A block whose maximum is -inf (no finite score) adds nothing.
  float m = -INFINITY, l = 0.f;
  for (int j = tid; j < nblk; j += kEstimateThreads) {
    const float v = j == tid ? v0 : block_max[row + j], e = j == tid ? e0 : block_sum[row + j];
    if (on_chip) s_bmax[j] = v;
    if (v == -INFINITY) continue;
    if (v > m) {
      l = l * expf(m - v) + e;          // m = -inf at first: 0 * 0
      m = v;
    } else {
      l += e * expf(v - m);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    const float mm = fmaxf(m, m2);
    l = (m == -INFINITY ? 0.f : l * expf(m - mm)) + (m2 == -INFINITY ? 0.f : l2 * expf(m2 - mm));
    m = mm;
  }
  if (lane == 0) {
    s_fred[warp] = m;
    s_lred[warp] = l;
  }
  __syncthreads();
  if (tid == 0) {
    float mm = s_fred[0];
    for (int w = 1; w < num_warps; ++w) mm = fmaxf(mm, s_fred[w]);
    float ll = 0.f;
    for (int w = 0; w < num_warps; ++w)
      ll += s_fred[w] == -INFINITY ? 0.f : s_lred[w] * expf(s_fred[w] - mm);
    s_m = mm;
    s_l = ll;
    stats[((long long)b * num_q_heads + hq) * 2 + 0] = mm;
    stats[((long long)b * num_q_heads + hq) * 2 + 1] = ll;
  }
  const int k = min(min(topk, kMaxTopk), nblk);
  for (int r = tid; r < k; r += kEstimateThreads) s_sel[r] = 0;
  __syncthreads();
  m = s_m;
  l = s_l;

  // 2a. the k-th largest block maximum, as an order-preserving key, by radix select: four
  //     passes over its bytes, most significant first. Each pass histograms the next byte
  //     of the keys that share the bytes found so far (warp-aggregated shared atomics), and
  //     one warp finds the byte value where the count from the top reaches the rank still
  //     wanted. (Skipped for short sequences, where every block is a candidate.) Only
  //     blocks at or above the result can hold a slot. Same threshold as a bisection on its
  //     bits, in 4 passes instead of 32 (docs/perf-notes.md).
  unsigned threshold = 0;
  if (nblk > kEstimateSelectAbove && k > 0) {   // k >= 1: topk >= 1 (reference.AlignmentRule)
    unsigned prefix = 0, mask = 0;
    int want = k;                      // rank wanted among the keys that match `prefix`
    for (int shift = 24; shift >= 0; shift -= 8) {
      s_hist[tid] = 0;                 // kEstimateThreads == 256 bins
      __syncthreads();
      for (int j0 = 0; j0 < nblk; j0 += kEstimateThreads) {
        const int j = j0 + tid;
        const unsigned key = j < nblk ? akv_order_key(bmax[j]) : 0u;
        const bool in = j < nblk && (key & mask) == prefix;
        const unsigned digit = (key >> shift) & 0xFFu;
        const unsigned voters = __ballot_sync(0xffffffffu, in);
        if (in) {
          const unsigned same = __match_any_sync(voters, digit);
          if ((same & ((1u << lane) - 1u)) == 0u) atomicAdd(&s_hist[digit], __popc(same));
        }
      }
      __syncthreads();
      if (warp == 0) {
        int c[8], local = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) local += (c[i] = s_hist[8 * lane + i]);
        int suffix = local;            // keys in the bins of lanes >= this lane
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int v = __shfl_down_sync(0xffffffffu, suffix, o);
          if (lane + o < 32) suffix += v;
        }
        int above = suffix - local;    // keys in higher bins than this lane's
#pragma unroll
        for (int i = 7; i >= 0; --i) {
          if (above < want && above + c[i] >= want) {
            s_digit = 8 * lane + i;
            s_above = above;
          }
          above += c[i];
        }
      }
      __syncthreads();
      want -= s_above;
      prefix |= (unsigned)s_digit << shift;
      mask |= 0xFFu << shift;
    }
    threshold = prefix;
  }
  // 2b. gather the candidates (order does not matter: ranks are computed from values). At
  //     threshold 0 (no select ran, or, only for a NaN k-th key, it found 0) every block is
  //     one: the first kMaxTopk in block order with no shared atomics, the rest as below
  if (tid == 0) s_ncand = threshold == 0 ? min(nblk, kMaxTopk) : 0;
  if (threshold == 0)
    for (int j = tid; j < nblk && j < kMaxTopk; j += kEstimateThreads) s_cand[j] = j;
  __syncthreads();
  for (int j = threshold == 0 ? kMaxTopk + tid : tid; j < nblk; j += kEstimateThreads) {
    if (akv_order_key(bmax[j]) < threshold) continue;
    const int at = atomicAdd(&s_ncand, 1);
    if (at < kMaxTopk) {
      s_cand[at] = j;
    } else {  // more ties than the list holds (degenerate input): count alone
      const float v = bmax[j];
      int rank = 0;
      for (int i = 0; i < nblk && rank < k; ++i) {
        const float u = bmax[i];
        rank += (u > v) || (u == v && i < j);
      }
      if (rank < k) s_sel[rank] = j;
    }
  }
  __syncthreads();
  // 2c. one warp per candidate counts the blocks before it in (value desc, index asc) order;
  //     rank r < k is selection slot r
  const int ncand = min(s_ncand, kMaxTopk);
  for (int c = warp; c < ncand; c += num_warps) {
    const int j = s_cand[c];
    const float v = bmax[j];
    int rank = 0;
    for (int i = lane; i < nblk; i += 32) {
      const float u = bmax[i];
      rank += (u > v) || (u == v && i < j);
    }
    rank = akv_warp_sum_int(rank);
    if (lane == 0 && rank < k) s_sel[rank] = j;
  }
  __syncthreads();

  // 3. the estimate over the slots, in slot order
  const int h = hq / group;
  for (int r = tid; r < k; r += kEstimateThreads) {
    const int j = s_sel[r];
    const int tok = block_arg[row + j];            // a token of block j: both loads at once
    const int phys = block_table[(long long)b * blocks_per_seq + j];
    s_p[r] = expf(bmax[j] - m) / l;
    s_row[r] = (((long long)phys * num_kv_heads + h) * AKV_BLOCK_TOKENS + tok % AKV_BLOCK_TOKENS) * D;
  }
  __syncthreads();
  // the rows' hi bytes are staged in shared memory by every thread at once (one 16-byte load
  // each, kEstimateRowBytes per pass: one round trip for the default 32 slots, not one per
  // few rows), then thread d sums channel d over the pass's rows in slot order
  const int segs = D / 16, rows_per_pass = kEstimateRowBytes / D;
  float acc = 0.f;
  for (int r0 = 0; r0 < k; r0 += rows_per_pass) {
    const int i = tid / segs, seg = tid % segs;
    if (r0 + i < k)
      *reinterpret_cast<uint4*>(s_vrow + i * D + 16 * seg) =
          *reinterpret_cast<const uint4*>(v_hi + s_row[r0 + i] + 16 * seg);
    __syncthreads();
    if (tid < D) {
      const int rows = min(rows_per_pass, k - r0);
      for (int r = 0; r < rows; ++r)
        acc += s_p[r0 + r] * fabsf(akv_bits_to_float(akv_join_bits(s_vrow[r * D + tid], 0, 0, 8)));
    }
    __syncthreads();
  }
  if (tid < D) o_est[((long long)b * num_q_heads + hq) * D + tid] = acc;
  if (counters && tid == 0) atomicAdd(&counters[AKV_METADATA], (unsigned long long)(k * D));
}

// akv_decode_estimate_short: akv_decode_estimate's results (stats, O_est, counters) bit for
// bit, for a batch whose sequences all have at most kEstimateSelectAbove (64) blocks: every
// block is then a candidate and no select runs. (Not with NaN block maxima, a block whose
// every score is NaN: there both kernels let several blocks claim slot 0, and which one
// lands is a race in each.) The host launches it only for such batches, from its mirror
// of the lengths, and only where it is faster (kernels.py, CudaBackend._estimate_launch);
// the kernel does not check the bound (a longer sequence with topk > 64 would write past
// its warp's slot row). grid (ceil(Hq / 4), B); block 128 threads:
// one warp per query head, no block-wide barrier. Lane L holds blocks L and L + 32:
//  1. one round trip: the length, each block's statistics, arg-max token and block-table
//     entry; m and l merge as in akv_decode_estimate, where blocks 0-31 and 32-63 were the
//     first two warps (the same expressions in the same order, so the same fp32 bits);
//  2. rank of each block in (maximum desc, index asc) order by comparing against all
//     blocks (shuffles); rank r < k is slot r;
//  3. a second round trip: every slot's V hi bytes of the lane's channels (4 bytes at
//     head_dim 128, 2 at 64) at once, then O_est summed per channel in slot order.
// One round trip less than the 256-thread kernel, but a longer chain per warp: measured at
// 4k tokens, 7.0-8.0 us against 5.9-7.0 with up to 288 query heads x sequences, 8.4-9.2
// against 13.9-15.8 with 1024 (docs/perf-notes.md, ninth session).
constexpr int kShortEstimateWarps = 4;

template <int CPL>   // channels per lane: head_dim / 32
__device__ __forceinline__ void estimate_short_head(
    int hq, int b, int n, const uint8_t* __restrict__ v_hi,
    int num_kv_heads, int group, int topk, float v[2], float e[2], int arg[2], int phys[2],
    float* __restrict__ stats, float* __restrict__ o_est, unsigned long long* __restrict__ counters,
    int* s_sel) {
  constexpr int D = 32 * CPL;
  const int lane = threadIdx.x & 31;
  const int num_q_heads = num_kv_heads * group;
  const int nblk = (n + AKV_BLOCK_TOKENS - 1) / AKV_BLOCK_TOKENS;
  // 1. (m, l) of blocks L and L + 32, as akv_decode_estimate's per-thread loop leaves them
  float m[2], l[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    m[s] = -INFINITY;
    l[s] = 0.f;
    if (32 * s + lane < nblk && v[s] != -INFINITY) {
      if (v[s] > m[s]) {
        l[s] = l[s] * expf(m[s] - v[s]) + e[s];
        m[s] = v[s];
      } else {
        l[s] += e[s] * expf(v[s] - m[s]);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[s], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[s], o);
      const float mm = fmaxf(m[s], m2);
      l[s] = (m[s] == -INFINITY ? 0.f : l[s] * expf(m[s] - mm)) +
             (m2 == -INFINITY ? 0.f : l2 * expf(m2 - mm));
      m[s] = mm;
    }
  }
  // akv_decode_estimate's thread 0 over its eight warps; warps 2-7 held no block and add
  // exactly nothing (their max is -inf)
  const float mm = fmaxf(m[0], m[1]);
  float ll = 0.f;
  ll += m[0] == -INFINITY ? 0.f : l[0] * expf(m[0] - mm);
  ll += m[1] == -INFINITY ? 0.f : l[1] * expf(m[1] - mm);
  const long long head = (long long)b * num_q_heads + hq;
  if (lane == 0) {
    stats[head * 2 + 0] = mm;
    stats[head * 2 + 1] = ll;
  }
  const int k = min(min(topk, kMaxTopk), nblk);   // <= 64
  // 2. ranks; a slot no block claims (only with NaN maxima) stays block 0, as there
#pragma unroll
  for (int s = 0; s < 2; ++s)
    if (32 * s + lane < k) s_sel[32 * s + lane] = 0;
  __syncwarp();
  // 16 shuffles in flight per step (a loop of one dependent shuffle per block took ~1 us)
  int rank[2] = {0, 0};
  for (int i0 = 0; i0 < nblk; i0 += 16) {
    const float src = i0 < 32 ? v[0] : v[1];
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      const int i = i0 + u;
      const float x = __shfl_sync(0xffffffffu, src, i & 31);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int j = 32 * s + lane;
        rank[s] += i < nblk && ((x > v[s]) || (x == v[s] && i < j));
      }
    }
  }
#pragma unroll
  for (int s = 0; s < 2; ++s)
    if (32 * s + lane < nblk && rank[s] < k) s_sel[rank[s]] = 32 * s + lane;
  __syncwarp();
  // each slot's weight and V row (slots L and L + 32 in this lane), from the block's lane
  const int h = hq / group;
  float p[2];
  long long row[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int r = 32 * s + lane;
    const int j = r < k ? s_sel[r] : 0;
    const float vj0 = __shfl_sync(0xffffffffu, v[0], j & 31);
    const float vj1 = __shfl_sync(0xffffffffu, v[1], j & 31);
    const int a0 = __shfl_sync(0xffffffffu, arg[0], j & 31);
    const int a1 = __shfl_sync(0xffffffffu, arg[1], j & 31);
    const int f0 = __shfl_sync(0xffffffffu, phys[0], j & 31);
    const int f1 = __shfl_sync(0xffffffffu, phys[1], j & 31);
    const float vj = j < 32 ? vj0 : vj1;
    const int tok = j < 32 ? a0 : a1, ph = j < 32 ? f0 : f1;
    p[s] = expf(vj - mm) / ll;
    row[s] = (((long long)ph * num_kv_heads + h) * AKV_BLOCK_TOKENS + tok % AKV_BLOCK_TOKENS) * D;
  }
  // 3. the slots' hi bytes of channels CPL * L .. CPL * L + CPL - 1, 32 rows in flight (one
  //    round trip for the default topk of 32), then summed per channel in slot order
  float acc[CPL];
#pragma unroll
  for (int c = 0; c < CPL; ++c) acc[c] = 0.f;
  constexpr int R = 32;
  for (int r0 = 0; r0 < k; r0 += R) {
    uint32_t w[R];
    float pr[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int r = r0 + u, s = r >> 5;
      const float p0 = __shfl_sync(0xffffffffu, p[0], r & 31);
      const float p1 = __shfl_sync(0xffffffffu, p[1], r & 31);
      const long long q0 = __shfl_sync(0xffffffffu, row[0], r & 31);
      const long long q1 = __shfl_sync(0xffffffffu, row[1], r & 31);
      pr[u] = s == 0 ? p0 : p1;
      w[u] = 0u;
      if (r < k) {
        const uint8_t* src = v_hi + (s == 0 ? q0 : q1) + CPL * lane;
        if constexpr (CPL == 4) w[u] = *reinterpret_cast<const uint32_t*>(src);
        else w[u] = *reinterpret_cast<const unsigned short*>(src);
      }
    }
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (r0 + u >= k) break;
#pragma unroll
      for (int c = 0; c < CPL; ++c)
        acc[c] += pr[u] * fabsf(akv_bits_to_float(akv_join_bits((w[u] >> (8 * c)) & 0xFF, 0, 0, 8)));
    }
  }
#pragma unroll
  for (int c = 0; c < CPL; ++c) o_est[head * D + CPL * lane + c] = acc[c];
  if (counters && lane == 0) atomicAdd(&counters[AKV_METADATA], (unsigned long long)(k * D));
}

extern "C" __global__ void __launch_bounds__(32 * kShortEstimateWarps) akv_decode_estimate_short(
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ v_hi, int num_kv_heads, int group, int head_dim, int topk,
    const float* __restrict__ block_max, const float* __restrict__ block_sum,
    const int* __restrict__ block_arg, float* __restrict__ stats, float* __restrict__ o_est,
    unsigned long long* __restrict__ counters) {
  constexpr int NB = kEstimateSelectAbove;
  static_assert(NB == 64, "two blocks per lane");
  __shared__ int s_sel[kShortEstimateWarps][NB];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hq = blockIdx.x * kShortEstimateWarps + warp, b = blockIdx.y;
  const int num_q_heads = num_kv_heads * group;
  if (hq >= num_q_heads) return;
  const long long srow = ((long long)b * num_q_heads + hq) * blocks_per_seq;
  // one round trip: everything that depends on the block index alone (entries past the
  // sequence's blocks, within blocks_per_seq, are loaded and ignored)
  float v[2] = {-INFINITY, -INFINITY}, e[2] = {0.f, 0.f};
  int arg[2] = {0, 0}, phys[2] = {0, 0};
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int j = 32 * s + lane;
    if (j < blocks_per_seq) {
      v[s] = block_max[srow + j];
      e[s] = block_sum[srow + j];
      arg[s] = block_arg[srow + j];
      phys[s] = block_table[(long long)b * blocks_per_seq + j];
    }
  }
  const int n = lengths[b];
  if (head_dim == 128)
    estimate_short_head<4>(hq, b, n, v_hi, num_kv_heads, group, topk, v, e, arg,
                           phys, stats, o_est, counters, s_sel[warp]);
  else
    estimate_short_head<2>(hq, b, n, v_hi, num_kv_heads, group, topk, v, e, arg,
                           phys, stats, o_est, counters, s_sel[warp]);
}

// ---------------------------------------------------------------------- decode: values
// akv_decode_values<D>: grid (max blocks over the batch, Hk, B); block 128 threads.
// CTA (j, h, b) serves the GQA group of KV head h on logical block j:
//  1. r_g = min_d (e(O_est_gd) - e(v_exp_max_d)) + bias per query head g (reference.
//     v_reference_exponent); a block whose V holds Inf/NaN is read at 16 bits.
//  2. Thread t < 64: p_gt = exp(s_gt - m_g) / l_g; tier_t = max over g of
//     tier(r_g - e(p_gt)) (reference.v_tiers); 0 marks a token past the sequence end.
//  3. Thread (cq = tid % (D/4), tg = tid / (D/4)): channels 4cq..4cq+3 of tokens tg,
//     tg + 128/(D/4), ...; reads 4 hi bytes + 2 mid + 2 lo bytes per token as its tier asks.
//  4. Partials summed over token groups in order -> partial[b, hq, j, :] (fp32).
constexpr int kValueThreads = 128;

template <int D>
__device__ __forceinline__ void decode_values(
    const int* __restrict__ lengths, const int* __restrict__ block_table, int blocks_per_seq,
    const uint8_t* __restrict__ v_hi, const uint8_t* __restrict__ v_mid,
    const uint8_t* __restrict__ v_lo, const uint8_t* __restrict__ v_exp, int num_kv_heads,
    int group, int full_mode, int t8, int t12, int skip, int bias,
    const float* __restrict__ scores,
    const float* __restrict__ stats, const float* __restrict__ o_est,
    float* __restrict__ partial, unsigned long long* __restrict__ counters,
    uint8_t* __restrict__ v_tier_map) {
  constexpr int T = AKV_BLOCK_TOKENS, CQ = D / 4, TG = kValueThreads / CQ;
  __shared__ int s_rmin[AKV_MAX_GROUP][kValueThreads / 32];
  __shared__ int s_r[AKV_MAX_GROUP];
  __shared__ int s_special;
  __shared__ float s_p[AKV_MAX_GROUP][T];
  __shared__ int s_tier[T];
  __shared__ float s_red[TG][AKV_MAX_GROUP][D];

  const int b = blockIdx.z, h = blockIdx.y, blk = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = lengths[b];
  if (blk * T >= n) return;
  const int phys = block_table[(long long)b * blocks_per_seq + blk];
  const long long head = (long long)phys * num_kv_heads + h;
  const int num_q_heads = num_kv_heads * group;
  const uint8_t* vexp = v_exp + head * D;

  // 1. reference exponent per query head
  if (tid == 0) s_special = 0;
  __syncthreads();
  // (full mode reads V whole: no reference exponent, no exponent maxima read or counted)
  for (int g = 0; g < (full_mode ? 0 : group); ++g) {
    int r = 0x7fffffff;
    for (int d = tid; d < D; d += kValueThreads) {
      const int ev = vexp[d];
      if (g == 0 && ev == AKV_SPECIAL_EXPONENT) s_special = 1;
      const float oe = o_est[((long long)b * num_q_heads + h * group + g) * D + d];
      r = min(r, akv_unbiased_exp32(oe) - ((ev < 1 ? 1 : ev) - 15));
    }
    r = akv_warp_min_int(r);
    if (lane == 0) s_rmin[g][warp] = r;
  }
  __syncthreads();
  if (tid < group) {
    int r = s_rmin[tid][0];
    for (int w = 1; w < kValueThreads / 32; ++w) r = min(r, s_rmin[tid][w]);
    s_r[tid] = r + bias;
  }
  __syncthreads();

  // 2. weights and V tiers per token
  if (tid < T) {
    const int tok = blk * T + tid;
    const bool valid = tok < n;
    int tier = 0;
    for (int g = 0; g < group; ++g) {
      const long long qrow = (long long)b * num_q_heads + h * group + g;
      float p = 0.f;
      if (valid) {
        const float s = scores[qrow * ((long long)blocks_per_seq * T) + tok];
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
    const int t = tid;  // warps 0-1 cover the 64 tokens
    const int tier = s_tier[t];
    int n8 = akv_warp_sum_int(tier > 0), n12 = akv_warp_sum_int(tier >= 12),
        n16 = akv_warp_sum_int(tier >= 16);
    if (lane == 0) {
      atomicAdd(&counters[AKV_V_HI], (unsigned long long)(n8 * D));
      atomicAdd(&counters[AKV_V_MID], (unsigned long long)(n12 * D / 2));
      atomicAdd(&counters[AKV_V_LO], (unsigned long long)(n16 * D / 2));
      if (warp == 0 && !full_mode) atomicAdd(&counters[AKV_METADATA], (unsigned long long)D);
    }
  }

  // 3. accumulate p * v over this thread's tokens
  const int cq = tid % CQ, tg = tid / CQ;
  float acc[AKV_MAX_GROUP][4];
#pragma unroll
  for (int g = 0; g < AKV_MAX_GROUP; ++g)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[g][k] = 0.f;
  const uint8_t* vhi = v_hi + head * T * D;
  const uint8_t* vmid = v_mid + head * T * (D / 2);
  const uint8_t* vlo = v_lo + head * T * (D / 2);
#pragma unroll 4
  for (int t = tg; t < T; t += TG) {
    const int tier = s_tier[t];
    if (tier == 0) continue;
    const uint32_t hi4 = *reinterpret_cast<const uint32_t*>(vhi + t * D + 4 * cq);
    uint32_t mid2 = 0, lo2 = 0;
    if (tier >= 12) mid2 = *reinterpret_cast<const unsigned short*>(vmid + t * (D / 2) + 2 * cq);
    if (tier >= 16) lo2 = *reinterpret_cast<const unsigned short*>(vlo + t * (D / 2) + 2 * cq);
    float vv[4];
    akv_join4(hi4, mid2, lo2, tier, vv);
#pragma unroll
    for (int g = 0; g < AKV_MAX_GROUP; ++g) {
      if (g < group) {
        const float p = s_p[g][t];
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[g][k] = fmaf(p, vv[k], acc[g][k]);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < AKV_MAX_GROUP; ++g)
    if (g < group)
#pragma unroll
      for (int k = 0; k < 4; ++k) s_red[tg][g][4 * cq + k] = acc[g][k];
  __syncthreads();

  // 4. reduce over token groups in order
  for (int idx = tid; idx < group * D; idx += kValueThreads) {
    const int g = idx / D, d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int c = 0; c < TG; ++c) o += s_red[c][g][d];
    partial[(((long long)b * num_q_heads + h * group + g) * blocks_per_seq + blk) * D + d] = o;
  }
}

#define AKV_VALUES_ENTRY(D)                                                                  \
  extern "C" __global__ void __launch_bounds__(kValueThreads) akv_decode_values_d##D(       \
      const int* lengths, const int* block_table, int blocks_per_seq, const uint8_t* v_hi,   \
      const uint8_t* v_mid, const uint8_t* v_lo, const uint8_t* v_exp, int num_kv_heads,     \
      int group, int full_mode, int t8, int t12, int skip, int bias, const float* scores,    \
      const float* stats, const float* o_est, float* partial, unsigned long long* counters,  \
      uint8_t* v_tier_map) {                                                                 \
    decode_values<D>(lengths, block_table, blocks_per_seq, v_hi, v_mid, v_lo, v_exp,         \
                     num_kv_heads, group, full_mode, t8, t12, skip, bias, scores, stats, o_est, \
                     partial, counters, v_tier_map);                                         \
  }
AKV_VALUES_ENTRY(64)
AKV_VALUES_ENTRY(128)

// --------------------------------------------------------------------- decode: combine
// akv_decode_combine: grid (Hq, B); block C * D threads, C = 1 or kCombineChains (4), the
// host's choice (kernels.combine_chains). out[b, hq, d] = fp16(sum over the sequence's
// splits j of partial[b, hq, j, d]) in a fixed order whatever C is: four running sums, a_c
// over the splits j = c (mod 4) in order of j, then (a_0 + a_1) + (a_2 + a_3). C = 4: thread
// (c, d) keeps a_c, 8 loads in flight (loads past the last split read as +0, which adds
// exactly: a sum starting at +0 is never -0, as the build does not flush denormals to
// zero); C = 1: thread d keeps all four, 4 loads per step (the loop of the kernel before
// the eighth session, except that the leftover splits now go to sum j mod 4, not to sum
// 0; a 16-load version measured slower at batch 32). A split is `split_blocks` blocks (1 for versions 1 and 2). One thread per channel
// took 6-9 us at batch 1 with 256 and more splits (docs/perf-notes.md, eighth session).
constexpr int kCombineChains = 4;
constexpr int kCombineMaxHeadDim = 128;
extern "C" __global__ void __launch_bounds__(kCombineChains * kCombineMaxHeadDim)
akv_decode_combine(const int* __restrict__ lengths, int blocks_per_seq, int num_q_heads,
                   int head_dim, int split_blocks, const float* __restrict__ partial,
                   __half* __restrict__ out) {
  __shared__ float s_chain[kCombineChains - 1][kCombineMaxHeadDim];
  const int hq = blockIdx.x, b = blockIdx.y, D = head_dim;
  const int d = threadIdx.x % D, c = threadIdx.x / D;
  const int nsplit = ((lengths[b] + AKV_BLOCK_TOKENS - 1) / AKV_BLOCK_TOKENS + split_blocks - 1) /
                     split_blocks;
  const float* p = partial + ((long long)b * num_q_heads + hq) * blocks_per_seq * D + d;
  const long long row = ((long long)b * num_q_heads + hq) * D + d;
  if (blockDim.x == D) {               // C = 1
    float a[kCombineChains] = {0.f, 0.f, 0.f, 0.f};
    int j = 0;
    for (; j + 4 <= nsplit; j += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] += p[(long long)(j + u) * D];
    }
    for (; j < nsplit; ++j) a[j % kCombineChains] += p[(long long)j * D];
    out[row] = __float2half_rn((a[0] + a[1]) + (a[2] + a[3]));
    return;
  }
  constexpr int U = 8;                 // C = 4
  float a = 0.f;
  for (int j0 = c; j0 < nsplit; j0 += kCombineChains * U) {
    float v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + kCombineChains * u;
      v[u] = j < nsplit ? p[(long long)j * D] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) a += v[u];
  }
  if (c > 0) s_chain[c - 1][d] = a;
  __syncthreads();
  if (c == 0) out[row] = __float2half_rn((a + s_chain[0][d]) + (s_chain[1][d] + s_chain[2][d]));
}

// akv_decode_combine_rescale: the combine of the V-whole path (docs/design.md), where each
// split's partial is normalised by that split's own softmax statistics (m_j, l_j) in
// split_stats[(b, hq, j), 2] (akv_decode_values_whole_*) and no estimate phase ran.
// out = fp16(sum_j w_j partial_j / sum_j w_j), w_j = l_j exp(m_j - M), M = max_j m_j (a split
// whose m_j is -inf has no finite score and weighs 0): the flash-decoding merge. Grid
// (Hq, B); block C * D threads as akv_decode_combine. M by all threads (a max: any order);
// the weights one per thread into shared memory (kRescaleChunk splits at a time), while each
// thread's first partials are already loaded (kRescalePrefetch of them, issued before the
// statistics arrive); then running sums j mod 4 of w_j partial_j and of w_j in order of j,
// (a0 + a1) + (a2 + a3) over (l0 + l1) + (l2 + l3): C = 4, thread (c, d) keeps sum c; C = 1,
// thread d all four; the same bits either way. (A first version with an online rescaling
// per running sum, an exponential per split in every thread, was slower: 4.0 against the
// plain combine's 2.7 us at 64 splits, 8.3 against 4.4 at 256; docs/perf-notes.md.)
constexpr int kRescaleChunk = 1024;
constexpr int kRescalePrefetch = 16;
extern "C" __global__ void __launch_bounds__(kCombineChains * kCombineMaxHeadDim)
akv_decode_combine_rescale(const int* __restrict__ lengths, int blocks_per_seq, int num_q_heads,
                           int head_dim, int split_blocks, const float* __restrict__ partial,
                           const float* __restrict__ split_stats, __half* __restrict__ out) {
  __shared__ float s_w[kRescaleChunk];
  __shared__ float s_max[kCombineChains * kCombineMaxHeadDim / 32];
  __shared__ float s_chain[2][kCombineChains - 1][kCombineMaxHeadDim];
  const int hq = blockIdx.x, b = blockIdx.y, D = head_dim, tid = threadIdx.x;
  const int d = tid % D, c = tid / D, nthreads = blockDim.x;
  const bool one = nthreads == D;       // C = 1: this thread keeps all four sums
  const int stride = one ? 1 : kCombineChains;
  const int nsplit = ((lengths[b] + AKV_BLOCK_TOKENS - 1) / AKV_BLOCK_TOKENS + split_blocks - 1) /
                     split_blocks;
  const long long head = (long long)b * num_q_heads + hq;
  const float* p = partial + head * blocks_per_seq * D + d;
  const float2* st = reinterpret_cast<const float2*>(split_stats + head * blocks_per_seq * 2);
  // this thread's first partials: splits c, c + stride, ... (independent of the statistics)
  float v[kRescalePrefetch];
  const int first = one ? 0 : c;
#pragma unroll
  for (int u = 0; u < kRescalePrefetch; ++u) {
    const int j = first + stride * u;
    v[u] = j < nsplit ? p[(long long)j * D] : 0.f;
  }
  float mm = -INFINITY;
  for (int j = tid; j < nsplit; j += nthreads) mm = fmaxf(mm, st[j].x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
  if ((tid & 31) == 0) s_max[tid >> 5] = mm;
  __syncthreads();
  mm = s_max[0];
  for (int w = 1; w < (nthreads >> 5); ++w) mm = fmaxf(mm, s_max[w]);
  float a[kCombineChains] = {0.f, 0.f, 0.f, 0.f}, l[kCombineChains] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < nsplit; j0 += kRescaleChunk) {
    const int n = min(kRescaleChunk, nsplit - j0);
    if (j0 > 0) __syncthreads();        // the previous chunk's weights are read
    for (int i = tid; i < n; i += nthreads) {
      const float2 ml = st[j0 + i];
      s_w[i] = ml.x == -INFINITY ? 0.f : ml.y * expf(ml.x - mm);
    }
    __syncthreads();
    // this thread's splits of the chunk in order of j, into sum j mod 4 (a chunk starts at a
    // multiple of 4); the prefetched ones from registers (all in the first chunk)
    int i = first;
    if (one) {
      if (j0 == 0) {
#pragma unroll
        for (int u = 0; u < kRescalePrefetch; ++u)
          if (u < n) {
            a[u % 4] += s_w[u] * v[u];
            l[u % 4] += s_w[u];
          }
        i = kRescalePrefetch;
      }
      for (; i + 4 <= n; i += 4) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float w = s_w[i + k];
          a[k] += w * p[(long long)(j0 + i + k) * D];
          l[k] += w;
        }
      }
#pragma unroll
      for (int k = 0; k < 3; ++k)
        if (i + k < n) {
          a[k] += s_w[i + k] * p[(long long)(j0 + i + k) * D];
          l[k] += s_w[i + k];
        }
    } else {
      if (j0 == 0) {
#pragma unroll
        for (int u = 0; u < kRescalePrefetch; ++u) {
          const int ii = first + kCombineChains * u;
          if (ii < n) {
            a[0] += s_w[ii] * v[u];
            l[0] += s_w[ii];
          }
        }
        i = first + kCombineChains * kRescalePrefetch;
      }
      for (; i < n; i += kCombineChains) {
        const float w = s_w[i];
        a[0] += w * p[(long long)(j0 + i) * D];
        l[0] += w;
      }
    }
  }
  const long long row = head * D + d;
  if (one) {
    out[row] = __float2half_rn(((a[0] + a[1]) + (a[2] + a[3])) / ((l[0] + l[1]) + (l[2] + l[3])));
    return;
  }
  if (c > 0) {
    s_chain[0][c - 1][d] = a[0];
    s_chain[1][c - 1][d] = l[0];
  }
  __syncthreads();
  if (c == 0)
    out[row] = __float2half_rn(((a[0] + s_chain[0][0][d]) + (s_chain[0][1][d] + s_chain[0][2][d])) /
                               ((l[0] + s_chain[1][0][d]) + (s_chain[1][1][d] + s_chain[1][2][d])));
}

// ------------------------------------------------------------------ decode, version 2
// 16-byte loads, GQA group size as a template parameter (see akv_decode_v2.cuh); the
// estimate and combine kernels above serve both versions.
#include "akv_decode_v2.cuh"
AKV2_ENTRIES(64, 1)
AKV2_ENTRIES(64, 2)
AKV2_ENTRIES(64, 3)
AKV2_ENTRIES(64, 4)
AKV2_ENTRIES(64, 5)
AKV2_ENTRIES(64, 6)
AKV2_ENTRIES(64, 7)
AKV2_ENTRIES(64, 8)
AKV2_ENTRIES(128, 1)
AKV2_ENTRIES(128, 2)
AKV2_ENTRIES(128, 3)
AKV2_ENTRIES(128, 4)
AKV2_ENTRIES(128, 5)
AKV2_ENTRIES(128, 6)
AKV2_ENTRIES(128, 7)
AKV2_ENTRIES(128, 8)

// ------------------------------------------------------------------ decode, version 3
// Splits of several blocks per CTA (see akv_decode_v3.cuh).
#include "akv_decode_v3.cuh"
AKV3_ENTRIES(3, 0, 0, 64, 1)
AKV3_ENTRIES(3, 0, 0, 64, 2)
AKV3_ENTRIES(3, 0, 0, 64, 3)
AKV3_ENTRIES(3, 0, 0, 64, 4)
AKV3_ENTRIES(3, 0, 0, 64, 5)
AKV3_ENTRIES(3, 0, 0, 64, 6)
AKV3_ENTRIES(3, 0, 0, 64, 7)
AKV3_ENTRIES(3, 0, 0, 64, 8)
AKV3_ENTRIES(3, 0, 0, 128, 1)
AKV3_ENTRIES(3, 0, 0, 128, 2)
AKV3_ENTRIES(3, 0, 0, 128, 3)
AKV3_ENTRIES(3, 0, 0, 128, 4)
AKV3_ENTRIES(3, 0, 0, 128, 5)
AKV3_ENTRIES(3, 0, 0, 128, 6)
AKV3_ENTRIES(3, 0, 0, 128, 7)
AKV3_ENTRIES(3, 0, 0, 128, 8)

// ------------------------------------------------------------------ decode, version 4
// Version 3 with cp.async staging through dynamic shared memory (GQA groups up to 4).
// Stages per kernel (the host's kernels.py STAGES_V4 must agree): head_dim 128: scores 4,
// values 6; head_dim 64: scores 6, values 8.
AKV3_ENTRIES(4, 6, 8, 64, 1)
AKV3_ENTRIES(4, 6, 8, 64, 2)
AKV3_ENTRIES(4, 6, 8, 64, 3)
AKV3_ENTRIES(4, 6, 8, 64, 4)
AKV3_ENTRIES(4, 4, 6, 128, 1)
AKV3_ENTRIES(4, 4, 6, 128, 2)
AKV3_ENTRIES(4, 4, 6, 128, 3)
AKV3_ENTRIES(4, 4, 6, 128, 4)

// ------------------------------------------------------------------ decode, version 5
// Version 3's scores, values on tensor cores (see akv_decode_v5.cuh).
#include "akv_decode_v5.cuh"
AKV5_ENTRIES(5, 6, 1, 64, 1)
AKV5_ENTRIES(5, 6, 1, 64, 2)
AKV5_ENTRIES(5, 6, 1, 64, 3)
AKV5_ENTRIES(5, 6, 1, 64, 4)
AKV5_ENTRIES(5, 4, 1, 64, 5)
AKV5_ENTRIES(5, 4, 1, 64, 6)
AKV5_ENTRIES(5, 4, 1, 64, 7)
AKV5_ENTRIES(5, 4, 1, 64, 8)
AKV5_ENTRIES(5, 6, 1, 128, 1)
AKV5_ENTRIES(5, 6, 1, 128, 2)
AKV5_ENTRIES(5, 6, 1, 128, 3)
AKV5_ENTRIES(5, 6, 1, 128, 4)
AKV5_ENTRIES(5, 4, 1, 128, 5)
AKV5_ENTRIES(5, 4, 1, 128, 6)
AKV5_ENTRIES(5, 4, 1, 128, 7)
AKV5_ENTRIES(5, 4, 1, 128, 8)
// EXPERIMENT: head_dim 128 with the channels split over warp pairs, 8 CTAs per SM
AKV5_ENTRIES(6, 8, 2, 128, 1)
AKV5_ENTRIES(6, 8, 2, 128, 2)
AKV5_ENTRIES(6, 8, 2, 128, 3)
AKV5_ENTRIES(6, 8, 2, 128, 4)
AKV5_ENTRIES(6, 6, 2, 128, 5)
AKV5_ENTRIES(6, 6, 2, 128, 6)
AKV5_ENTRIES(6, 6, 2, 128, 7)
AKV5_ENTRIES(6, 6, 2, 128, 8)
AKV5_ENTRIES(6, 6, 1, 64, 1)
AKV5_ENTRIES(6, 6, 1, 64, 2)
AKV5_ENTRIES(6, 6, 1, 64, 3)
AKV5_ENTRIES(6, 6, 1, 64, 4)
AKV5_ENTRIES(6, 4, 1, 64, 5)
AKV5_ENTRIES(6, 4, 1, 64, 6)
AKV5_ENTRIES(6, 4, 1, 64, 7)
AKV5_ENTRIES(6, 4, 1, 64, 8)

// ------------------------------------------------------------------ decode, version 7
// q·Kᵀ on tensor cores too (akv_decode_v7.cuh); values as version 6.
#include "akv_decode_v7.cuh"
AKV7_ENTRIES(8, 2, 128, 1)
AKV7_ENTRIES(8, 2, 128, 2)
AKV7_ENTRIES(8, 2, 128, 3)
AKV7_ENTRIES(8, 2, 128, 4)
AKV7_ENTRIES(6, 2, 128, 5)
AKV7_ENTRIES(6, 2, 128, 6)
AKV7_ENTRIES(6, 2, 128, 7)
AKV7_ENTRIES(6, 2, 128, 8)
AKV7_ENTRIES(6, 1, 64, 1)
AKV7_ENTRIES(6, 1, 64, 2)
AKV7_ENTRIES(6, 1, 64, 3)
AKV7_ENTRIES(6, 1, 64, 4)
AKV7_ENTRIES(4, 1, 64, 5)
AKV7_ENTRIES(4, 1, 64, 6)
AKV7_ENTRIES(4, 1, 64, 7)
AKV7_ENTRIES(4, 1, 64, 8)

#include "akv_decode_v8.cuh"
AKV8_ENTRIES(128, 1)
AKV8_ENTRIES(128, 2)
AKV8_ENTRIES(128, 3)
AKV8_ENTRIES(128, 4)
AKV8_ENTRIES(128, 5)
AKV8_ENTRIES(128, 6)
AKV8_ENTRIES(128, 7)
AKV8_ENTRIES(128, 8)
AKV8_ENTRIES(64, 1)
AKV8_ENTRIES(64, 2)
AKV8_ENTRIES(64, 3)
AKV8_ENTRIES(64, 4)
AKV8_ENTRIES(64, 5)
AKV8_ENTRIES(64, 6)
AKV8_ENTRIES(64, 7)
AKV8_ENTRIES(64, 8)
