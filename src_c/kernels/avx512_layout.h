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

/* In-register transpose of 16 x 16 dwords: r[i] lane j becomes r[j] lane i. */
static inline void kt_z_transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) { /* s[4i + c]: rows 4i..4i+3, column c of each 128-bit lane */
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; c++) { /* 4 x 4 transpose of the 128-bit lanes of s[c], s[4+c], ... */
    const __m512i u0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
    const __m512i u1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
    const __m512i u2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i u3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
    t[c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
  }
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

#endif /* KTSFT_AVX512_LAYOUT_H */
