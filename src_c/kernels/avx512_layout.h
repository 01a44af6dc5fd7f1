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

#endif /* KTSFT_AVX512_LAYOUT_H */
