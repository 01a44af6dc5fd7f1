/* gemm_avx512_bf16emu.c - the vdpbf16ps kernel source of gemm_avx512_bf16.c run on a software
 * model of the instruction, in AVX-512F, so that CPUs without AVX512_BF16 test that code.
 *
 * The model follows Intel's definition: per fp32 lane i,
 *   acc += a.bf16[2i+1] * b.bf16[2i+1];  acc += a.bf16[2i] * b.bf16[2i]
 * each step one fused multiply-add rounded to nearest even, input denormals (the accumulator's
 * too) read as zero and denormal results flushed to zero, MXCSR ignored. */
#include "avx512_layout.h"

/* Denormals (zero exponent, nonzero mantissa) to a zero of the same sign. */
static inline __m512 kt_daz(__m512 x) {
  const __m512i xi = _mm512_castps_si512(x);
  const __mmask16 normal = _mm512_test_epi32_mask(xi, _mm512_set1_epi32(0x7f800000));
  const __m512i sign = _mm512_and_si512(xi, _mm512_set1_epi32((int)0x80000000u));
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(normal, sign, xi));
}

static inline __m512 kt_dpbf16_model(__m512 acc, __m512i a, __m512i b) {
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  const __m512 a_odd = kt_daz(_mm512_castsi512_ps(_mm512_and_si512(a, hi)));
  const __m512 b_odd = kt_daz(_mm512_castsi512_ps(_mm512_and_si512(b, hi)));
  const __m512 a_even = kt_daz(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)));
  const __m512 b_even = kt_daz(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
  acc = kt_daz(_mm512_fmadd_ps(a_odd, b_odd, kt_daz(acc)));
  return kt_daz(_mm512_fmadd_ps(a_even, b_even, acc));
}

#define KT_DPBF16(acc, a, b) kt_dpbf16_model((acc), (a), (b))
#define KT_NT_DP_NAME kt_avx512_nt_bf16_dp_model
#define KT_NN_DP_NAME kt_avx512_nn_bf16_dp_model
#include "avx512_nt_dp.h"
