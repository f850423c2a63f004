// Bit-plane helpers shared by the akv kernels (DESIGN.md section 3).
//
// fp16 bits b15..b0 are stored as three planes: hi = b15..b8 (a byte), mid = b7..b4 and
// lo = b3..b0 (nibbles, two values per byte, the even one in the low nibble). A tier is the
// number of high bits read: 8 (hi), 12 (hi+mid) or 16 (all). Dropped bits are refilled with
// the midpoint pattern (0x80 at tier 8, 0x8 at tier 12); a value whose exponent field is all
// ones (Inf/NaN) is refilled with zeros so that Inf stays Inf.
// The numpy twins are akv_runtime/reference.py: join_planes, exponent_field16,
// unbiased_exponent32, tier_from_gap.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>

#define AKV_BLOCK_TOKENS 64

// The most 128-thread CTAs one SM holds on the architecture being compiled: 8 on sm_75
// (1024 threads per SM), 12 on sm_86 and sm_89 (1536), 16 elsewhere (2048). A launch
// bound's minimum CTAs per SM above it is one ptxas ignores with a warning, so
// AKV_MINB_FIT passes 0 (no minimum: the same code) there instead.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
#define AKV_CTAS_128 8
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890)
#define AKV_CTAS_128 12
#else
#define AKV_CTAS_128 16
#endif
#define AKV_MINB_FIT(N) ((N) <= AKV_CTAS_128 ? (N) : 0)
#define AKV_MAX_GROUP 8
#define AKV_SPECIAL_EXPONENT 31

// Counter slots (akv_runtime/layout.py COUNTER_NAMES).
enum AkvCounter {
  AKV_K_HI = 0, AKV_K_MID, AKV_K_LO, AKV_V_HI, AKV_V_MID, AKV_V_LO, AKV_METADATA, AKV_VALUES,
  AKV_NUM_COUNTERS
};

// Biased fp16 exponent field read from the hi byte; subnormal and zero count as 1.
__device__ __forceinline__ int akv_exp_field_hi(uint32_t hi) {
  int e = (hi >> 2) & 0x1F;
  return e < 1 ? 1 : e;
}

// floor(log2|x|) of a float32 from its exponent field (subnormal and zero give -126).
__device__ __forceinline__ int akv_unbiased_exp32(float x) {
  int e = (__float_as_uint(x) >> 23) & 0xFF;
  return (e < 1 ? 1 : e) - 127;
}

__device__ __forceinline__ int akv_tier_from_gap(int gap, int t8, int t12) {
  return gap >= t8 ? 8 : (gap >= t12 ? 12 : 16);
}

// V side: tier 0 (the token is not read) at gap >= skip (reference.tier_from_gap); the
// caller passes rule.v_skip + akv_skip_budget(length).
__device__ __forceinline__ int akv_v_tier_from_gap(int gap, int skip, int t8, int t12) {
  return gap >= skip ? 0 : akv_tier_from_gap(gap, t8, t12);
}

// reference.skip_budget: ceil(ceil(log2 n) / 2) for a sequence of n >= 1 tokens.
__device__ __forceinline__ int akv_skip_budget(int n) {
  const int ceil_log2 = n > 1 ? 32 - __clz(n - 1) : 0;
  return (ceil_log2 + 1) >> 1;
}

// fp16 bit pattern from planes read at `tier` (one value).
__device__ __forceinline__ uint32_t akv_join_bits(uint32_t hi, uint32_t mid, uint32_t lo,
                                                  int tier) {
  const bool special = (hi & 0x7C) == 0x7C;
  uint32_t bits = hi << 8;
  if (tier >= 16) {
    bits |= (mid << 4) | lo;
  } else if (tier >= 12) {
    bits |= (mid << 4) | (special ? 0u : 0x8u);
  } else {
    bits |= special ? 0u : 0x80u;
  }
  return bits;
}

__device__ __forceinline__ float akv_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Four consecutive values sharing one tier: hi4 holds 4 hi bytes (value k in byte k),
// mid2/lo2 hold 4 nibbles each (value k in bits 4k..4k+3).
__device__ __forceinline__ void akv_join4(uint32_t hi4, uint32_t mid2, uint32_t lo2, int tier,
                                          float out[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = akv_bits_to_float(akv_join_bits((hi4 >> (8 * k)) & 0xFF, (mid2 >> (4 * k)) & 0xF,
                                             (lo2 >> (4 * k)) & 0xF, tier));
  }
}

// (a & k) | (b & ~k) in one LOP3 (ptxas had spent an extra AND on the masked shift of
// assemble8's nibble merges: two instructions per merge instead of three; twelfth session).
__device__ __forceinline__ uint32_t akv_bitsel(uint32_t a, uint32_t b, uint32_t k) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(a), "r"(b), "r"(k));
  return r;
}
// The low bytes (mid nibble << 4 | lo nibble) of the even and of the odd values of 8 values
// whose mid / lo nibbles are m / l (value k in bits 4k..4k+3): byte i of the result is value
// 2i's (even) or 2i+1's (odd).
__device__ __forceinline__ uint32_t akv_low_bytes_even(uint32_t m, uint32_t l) {
  return akv_bitsel(m << 4, l, 0xF0F0F0F0u);
}
__device__ __forceinline__ uint32_t akv_low_bytes_odd(uint32_t m, uint32_t l) {
  return akv_bitsel(m, l >> 4, 0xF0F0F0F0u);
}

// mma A registers of two rows p, q of 8 values each (hi bytes: x values 0-3, y 4-7; m, l:
// their mid and lo nibbles, value k in bits 4k..4k+3, already holding the tier's refill):
// even[k] = (value 2k of p, value 2k of q) and odd[k] = (value 2k+1 of p, of q) as fp16
// pairs, p in the low half. The low bytes and the hi bytes are first interleaved p, q, then
// merged: 16 byte permutes for 8 registers (assemble8's half2 words and a transpose took
// 20; twelfth session). The decode kernels' rows are K's channel rows over 8 tokens (the
// scores kernels: akv7::kstep_mma) or V's token rows over 8 channels (the values kernels).
__device__ __forceinline__ void akv_pair_frags(uint32_t hxp, uint32_t hyp, uint32_t mp,
                                               uint32_t lp, uint32_t hxq, uint32_t hyq,
                                               uint32_t mq, uint32_t lq, uint32_t (&even)[4],
                                               uint32_t (&odd)[4]) {
  const uint32_t ep = akv_low_bytes_even(mp, lp), eq = akv_low_bytes_even(mq, lq);
  const uint32_t op = akv_low_bytes_odd(mp, lp), oq = akv_low_bytes_odd(mq, lq);
  // low bytes, p and q interleaved: values 0 2 (e01), 4 6 (e23); 1 3 (o01), 5 7 (o23)
  const uint32_t e01 = __byte_perm(ep, eq, 0x5140), e23 = __byte_perm(ep, eq, 0x7362);
  const uint32_t o01 = __byte_perm(op, oq, 0x5140), o23 = __byte_perm(op, oq, 0x7362);
  // hi bytes the same way
  const uint32_t hxe = __byte_perm(hxp, hxq, 0x6240), hxo = __byte_perm(hxp, hxq, 0x7351);
  const uint32_t hye = __byte_perm(hyp, hyq, 0x6240), hyo = __byte_perm(hyp, hyq, 0x7351);
  even[0] = __byte_perm(e01, hxe, 0x5140);              // value 0: (p, q)
  even[1] = __byte_perm(e01, hxe, 0x7362);              // value 2
  even[2] = __byte_perm(e23, hye, 0x5140);              // value 4
  even[3] = __byte_perm(e23, hye, 0x7362);              // value 6
  odd[0] = __byte_perm(o01, hxo, 0x5140);               // value 1
  odd[1] = __byte_perm(o01, hxo, 0x7362);               // value 3
  odd[2] = __byte_perm(o23, hyo, 0x5140);               // value 5
  odd[3] = __byte_perm(o23, hyo, 0x7362);               // value 7
}

// A 4-byte global load at p + OFF (a compile-time byte offset) if `pred`, else `otherwise`
// (the decode kernels pass a plane's tier refill, so the word needs no select after the
// load). Written in PTX so that the address is one register plus the instruction's
// immediate: from C++, ptxas recomputed the 64-bit address under each predicate (~10
// integer instructions per conditional plane load; docs/perf-notes.md, sixth session).
template <int OFF>
__device__ __forceinline__ uint32_t akv_load_u32_if(const uint8_t* p, bool pred,
                                                    uint32_t otherwise = 0u) {
  uint32_t v = otherwise;
  asm("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %2, 0;\n\t@q ld.global.u32 %0, [%1+%3];\n\t}"
      : "+r"(v)
      : "l"(p), "r"((int)pred), "n"(OFF));
  return v;
}

// A uint32 that orders like the float (larger float, larger key); -0 counts as +0.
__device__ __forceinline__ unsigned akv_order_key(float f) {
  const unsigned u = __float_as_uint(f == 0.f ? 0.f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float akv_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int akv_warp_max_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int akv_warp_min_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int akv_warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp: the maximum of a block's 64 scores (lane l holds tokens l and l + 32 in s0, s1;
// -inf marks tokens past the sequence end), its first arg-max (as a token index of the
// sequence) and the sum of exp(s - max); lane 0 writes them at index `at`
// (reference.decode_attention's bmax, barg, bsum).
__device__ __forceinline__ void akv_block_stats2(float s0, float s1, int lane, int blk,
                                                 long long at, float* block_max,
                                                 float* block_sum, int* block_arg) {
  const float m = akv_warp_max(fmaxf(s0, s1));
  int arg = s0 == m ? lane : (s1 == m ? lane + 32 : AKV_BLOCK_TOKENS);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) arg = min(arg, __shfl_xor_sync(0xffffffffu, arg, o));
  float e = (s0 == -INFINITY ? 0.f : expf(s0 - m)) + (s1 == -INFINITY ? 0.f : expf(s1 - m));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
  if (lane == 0) {
    block_max[at] = m;
    block_sum[at] = e;
    block_arg[at] = blk * AKV_BLOCK_TOKENS + (arg < AKV_BLOCK_TOKENS ? arg : 0);
  }
}

// The same from a shared row of 64 scores.
__device__ __forceinline__ void akv_block_stats(const float* scores64, int lane, int blk,
                                                long long at, float* block_max,
                                                float* block_sum, int* block_arg) {
  akv_block_stats2(scores64[lane], scores64[lane + 32], lane, blk, at, block_max, block_sum,
                   block_arg);
}

// The per-block epilogue of the split scores kernels (versions 3-7), once the four warps'
// partial sums of block `blk` are in shared memory and the CTA has synchronised: warp w
// takes heads w, w + 4, ...; lane l tokens l and l + 32. It sums the four partials in a
// fixed order (part(w', g, t) reads warp w''s partial for head g, token t), scales,
// stores each valid score at scores_out[(qhead + g) * srow + blk * 64 + t] and writes the
// block's statistics: no shared score row and no second barrier (the kernels alternate two
// partial-sum buffers so that the next block's stores cannot overtake these reads;
// docs/perf-notes.md, sixth session).
template <int G, class Part>
__device__ __forceinline__ void akv_score_block_epilogue(
    Part&& part, int warp, int lane, int blk, int n, float scale, float* scores_out,
    long long qhead, long long srow, int blocks_per_seq, float* block_max, float* block_sum,
    int* block_arg) {
  constexpr int T = AKV_BLOCK_TOKENS;
  for (int g = warp; g < G; g += 4) {
    float s[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int t = lane + 32 * k;
      float v = ((part(0, g, t) + part(1, g, t)) + part(2, g, t)) + part(3, g, t);
      v *= scale;
      const bool valid = blk * T + t < n;
      if (valid) scores_out[(qhead + g) * srow + (long long)blk * T + t] = v;
      s[k] = valid ? v : -INFINITY;
    }
    akv_block_stats2(s[0], s[1], lane, blk, (qhead + g) * blocks_per_seq + blk, block_max,
                     block_sum, block_arg);
  }
}
