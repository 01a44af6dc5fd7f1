/* act_avx512.c - sigmoid and silu, 16 lanes at a time (spec 4: relative error <= 1e-6), and the
 * bf16 store of kt_f32_to_bf16.
 *
 * e = exp(-|x|) never overflows: n = round(y / ln 2), r = y - n ln 2 (two-part ln 2), e^r by its
 * degree-7 Taylor polynomial (truncation 5e-9 on |r| <= ln2 / 2), 2^n put into the exponent.
 * Below 2^-126 e is taken as 0: sigmoid(x) = 1 / (1 + e) or e / (1 + e) by the sign of x then has
 * the right limits (0 and 1, never NaN) and silu = x * sigmoid(x). */
#include <immintrin.h>

#include "../internal.h"

static inline __m512 exp_neg_abs(__m512 x) {
  const __m512 y = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)); /* -|x|, NaN stays */
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  /* n >= -126 here: 2^n is a normal float; below, the result is 0 */
  const __mmask16 tiny = _mm512_cmp_ps_mask(n, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  const __m512i ni = _mm512_cvtps_epi32(_mm512_max_ps(n, _mm512_set1_ps(-126.0f)));
  const __m512 scale =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mul_ps((__mmask16)~tiny, p, scale);
}

static inline __m512 sigmoid16(__m512 x) {
  const __m512 e = exp_neg_abs(x);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
}

void kt_act_avx512_sigmoid(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, sigmoid16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

void kt_act_avx512_silu(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, sigmoid16(v)));
  }
}

/* kt_f32_to_bf16 on 16 lanes: (u + 0x7fff + bit 16 of u) >> 16, a NaN (|u| above the infinity)
 * u >> 16 with the quiet bit set; the same bits as the scalar rule. */
static inline __m256i f32_to_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

void kt_store_bf16_avx512(uint16_t *dst, const float *v, int64_t n, int accumulate) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    __m512 x = _mm512_maskz_loadu_ps(m, v + i);
    if (accumulate) /* bf16 dst widened exactly, the sum in fp32 */
      x = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, dst + i)), 16)),
                        x);
    _mm256_mask_storeu_epi16(dst + i, m, f32_to_bf16x16(x));
  }
}
