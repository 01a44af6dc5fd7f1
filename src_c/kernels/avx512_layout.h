/* avx512_layout.h - zmm helpers shared by the avx512 family's kernel files (static inline
 * only: each file is compiled with its own flags). The layout is vnni_layout.h's. */
#ifndef KTSFT_AVX512_LAYOUT_H
#define KTSFT_AVX512_LAYOUT_H

#include <immintrin.h>

#include "vnni_layout.h"

enum { KT_Z_NT_MR = 12 /* rows of A per x W^T register tile (12 x 32 outputs) */ };

/* The first n lanes (all for n >= 16). */
static inline __mmask16 kt_z_mask(int64_t n) {
  return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

/* Stores acc to c[0 .. n) (n <= 16): fp32. */
static inline void kt_z_store(float *c, __m512 acc, int64_t n) {
  if (n >= 16)
    _mm512_storeu_ps(c, acc);
  else
    _mm512_mask_storeu_ps(c, (__mmask16)((1u << n) - 1u), acc);
}

/* c[0 .. n) = sa * sw[0 .. n) * dot (n <= 16): an int32 row of an int8 GEMM with both scales.
 * sw has one entry per row of W: the mask keeps the last block inside it. */
static inline void kt_z_store_scaled(float *c, __m512i dot, float sa, const float *sw, int64_t n) {
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(sa), _mm512_maskz_loadu_ps(kt_z_mask(n), sw));
  kt_z_store(c, _mm512_mul_ps(s, _mm512_cvtepi32_ps(dot)), n);
}

#endif /* KTSFT_AVX512_LAYOUT_H */
