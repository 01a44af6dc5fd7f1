/* avx512_layout.h - the avx512 family's packed weight layout and the helpers its kernel files
 * share (static inline only: each file is compiled with its own flags).
 *
 * A [rows, cols] matrix is stored in blocks of 16 rows (the lanes of a zmm register); inside a
 * block, "units" of 4 bytes per row follow each other, 64 bytes per unit: a unit holds 2
 * consecutive columns (bf16) or 4 (int8) of each of the 16 rows. That is the operand layout of
 * vdpbf16ps and vpdpbusd ("VNNI" layout), so x W^T streams it directly; x W (the backward)
 * transposes 16 x 16 units in registers into a small per-thread fp32 scratch. Rows are padded
 * to 16 and units to a multiple of 16 with zeros, so every load is whole. int8 matrices are
 * followed by one int32 per (padded) row: the sum of the row's values, which undoes the +128
 * offset that vpdpbusd's unsigned operand needs. */
#ifndef KTSFT_AVX512_LAYOUT_H
#define KTSFT_AVX512_LAYOUT_H

#include <immintrin.h>

#include "../internal.h"

enum {
  KT_Z_LANES = 16, /* fp32 lanes of a zmm; rows of a block */
  KT_Z_UNIT = 64,  /* bytes of one unit */
  KT_Z_NT_MR = 12, /* rows of A per x W^T register tile (12 x 32 outputs) */
};

static inline int64_t kt_z_per_unit(kt_wtype t) { return t == KT_WTYPE_INT8 ? 4 : 2; }
static inline int64_t kt_z_rows_padded(int64_t rows) { return (rows + 15) & ~(int64_t)15; }
/* Units per block row: columns rounded up to 16 units. */
static inline int64_t kt_z_units(int64_t cols, kt_wtype t) {
  const int64_t per = kt_z_per_unit(t) * 16;
  return (cols + per - 1) / per * 16;
}
static inline const char *kt_z_unit_ptr(const void *data, int64_t units, int64_t block,
                                        int64_t unit) {
  return (const char *)data + (block * units + unit) * KT_Z_UNIT;
}
/* The int8 row sums that follow the data. */
static inline const int32_t *kt_z_rowsum(const kt_packed *w) {
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT8);
  return (const int32_t *)((const char *)w->data +
                           kt_z_rows_padded(w->rows) * units * KT_Z_UNIT / 16);
}

/* Copies rows m0 .. m0 + mr of A (bf16) into dst, zero padded to `len` values per row. */
static inline void kt_z_copy_rows_bf16(const kt_rows *a, int64_t m0, int64_t mr, int64_t k,
                                       uint16_t *dst, int64_t len) {
  for (int64_t i = 0; i < mr; i++) {
    memcpy(dst + i * len, kt_row(a, m0 + i), (size_t)k * 2);
    memset(dst + i * len + k, 0, (size_t)(len - k) * 2);
  }
}

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
