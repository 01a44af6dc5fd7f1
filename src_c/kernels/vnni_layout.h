/* vnni_layout.h - the packed weight layout of the avx512 and avx2 families, and its packing
 * (plain C, static inline only: each family file is compiled with its own flags).
 *
 * A [rows, cols] matrix is stored in blocks of 16 rows (the lanes of a zmm register, two ymm);
 * inside a block, "units" of 4 bytes per row follow each other, 64 bytes per unit: a unit holds 2
 * consecutive columns (bf16) or 4 (int8, fp8) of each of the 16 rows. That is the operand layout of
 * vdpbf16ps and vpdpbusd ("VNNI" layout), so x W^T streams it directly; x W (the backward)
 * transposes units in registers into a small per-thread fp32 scratch. Rows are padded to 16 and
 * units to a multiple of 16 with zeros, so every load is whole. int8 matrices are followed by
 * one int32 per (padded) row: the sum of the row's values, which undoes the +128 offset that
 * vpdpbusd's unsigned operand needs. */
#ifndef KTSFT_VNNI_LAYOUT_H
#define KTSFT_VNNI_LAYOUT_H

#include "../internal.h"

enum {
  KT_Z_UNIT = 64, /* bytes of one unit */
};

static inline int64_t kt_z_per_unit(kt_wtype t) { return t == KT_WTYPE_BF16 ? 2 : 4; }
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

/* Rows m0 .. m0 + mr of int8 A as the sign-extended int16 pairs vpmaddwd takes against a
 * packed int8 unit: per unit u, the pairs (A[4u], A[4u+2]) and (A[4u+1], A[4u+3]), zero past k;
 * `len` = 2 * units int32 per row. */
static inline void kt_z_q8_pairs(const kt_rows_q8 *a, int64_t m0, int64_t mr, int64_t k,
                                 int64_t units, int32_t *ap, int64_t len) {
  for (int64_t i = 0; i < mr; i++) {
    const int64_t src = a->index ? (int64_t)a->index[m0 + i] : m0 + i;
    const int8_t *row = a->base + src * a->ld;
    for (int64_t u = 0; u < units; u++) {
      int32_t q[4] = {0, 0, 0, 0};
      for (int64_t t = 0; t < 4 && 4 * u + t < k; t++) q[t] = row[4 * u + t];
      ap[i * len + 2 * u] = (int32_t)(((uint32_t)q[2] << 16) | ((uint32_t)q[0] & 0xffffu));
      ap[i * len + 2 * u + 1] = (int32_t)(((uint32_t)q[3] << 16) | ((uint32_t)q[1] & 0xffffu));
    }
  }
}

/* Byte offset of W[r, c] in the packed layout. */
static inline size_t kt_z_offset(int64_t units, int64_t r, int64_t c, kt_wtype t) {
  const int64_t per = kt_z_per_unit(t), size = kt_wtype_size(t);
  return (size_t)(((r / 16) * units + c / per) * KT_Z_UNIT + (r % 16) * 4 + (c % per) * size);
}

static inline size_t kt_z_packed_bytes(int64_t rows, int64_t cols, kt_wtype t) {
  const size_t data = (size_t)(kt_z_rows_padded(rows) * kt_z_units(cols, t)) * KT_Z_UNIT / 16;
  return t == KT_WTYPE_INT8 ? data + (size_t)kt_z_rows_padded(rows) * sizeof(int32_t) : data;
}

static inline void kt_z_pack(void *dst, const void *src, int64_t rows, int64_t cols, kt_wtype t) {
  const int64_t units = kt_z_units(cols, t);
  memset(dst, 0, kt_z_packed_bytes(rows, cols, t));
  char *d = dst;
  if (t == KT_WTYPE_BF16) {
    const uint16_t *s = src;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t c = 0; c < cols; c++)
        memcpy(d + kt_z_offset(units, r, c, t), s + r * cols + c, 2);
    return;
  }
  if (t == KT_WTYPE_FP8) {
    const uint8_t *s = src;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t c = 0; c < cols; c++) d[kt_z_offset(units, r, c, t)] = (char)s[r * cols + c];
    return;
  }
  const int8_t *s = src;
  int32_t *rowsum = (int32_t *)(d + kt_z_rows_padded(rows) * units * KT_Z_UNIT / 16);
  for (int64_t r = 0; r < rows; r++) {
    int32_t sum = 0;
    for (int64_t c = 0; c < cols; c++) {
      d[kt_z_offset(units, r, c, t)] = (char)s[r * cols + c];
      sum += s[r * cols + c];
    }
    rowsum[r] = sum;
  }
}

static inline void kt_z_unpack(void *dst, const void *packed, int64_t rows, int64_t cols,
                               kt_wtype t) {
  const int64_t units = kt_z_units(cols, t), size = kt_wtype_size(t);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++)
      memcpy((char *)dst + (r * cols + c) * size,
             (const char *)packed + kt_z_offset(units, r, c, t), (size_t)size);
}

/* Source unit `u` of row block `b` of the fp8 panel decode_fp8 reads after (r0, c0, nr, nc):
 * its address, or NULL past the matrix. */
static inline const char *kt_z_fp8_next_unit(const kt_packed *w, int64_t r0, int64_t nr, int64_t c0,
                                             int64_t nc, kt_sweep sweep, int64_t b, int64_t u) {
  const int64_t su = kt_z_units(w->cols, KT_WTYPE_FP8);
  const int64_t block = r0 / 16 + b + (sweep == KT_SWEEP_ROWS ? kt_z_rows_padded(nr) / 16 : 0);
  const int64_t unit = c0 / 4 + u + (sweep == KT_SWEEP_COLS ? nc / 4 : 0);
  if (block >= kt_z_rows_padded(w->rows) / 16 || unit >= su) return NULL;
  return kt_z_unit_ptr(w->data, su, block, unit);
}

/* The table's decode_fp8 in plain C: each fp8 unit (4 columns of 16 rows) becomes two bf16
 * units. Every unit of the bf16 panel, padding included, comes from a unit of W (its padding
 * is zeros), so no clearing is needed. */
static inline void kt_z_decode_fp8(const kt_packed *w, int64_t r0, int64_t nr, int64_t c0,
                                   int64_t nc, kt_sweep sweep, void *dst) {
  (void)sweep;
  uint16_t table[256];
  for (int i = 0; i < 256; i++) table[i] = kt_e4m3_to_bf16((uint8_t)i);
  const int64_t su = kt_z_units(w->cols, KT_WTYPE_FP8), du = kt_z_units(nc, KT_WTYPE_BF16);
  for (int64_t b = 0; b < kt_z_rows_padded(nr) / 16; b++)
    for (int64_t u = 0; u < du / 2; u++) {
      const uint8_t *s = (const uint8_t *)kt_z_unit_ptr(w->data, su, r0 / 16 + b, c0 / 4 + u);
      uint16_t *d = (uint16_t *)(void *)((char *)dst + (b * du + 2 * u) * KT_Z_UNIT);
      for (int i = 0; i < 16; i++) {
        d[2 * i] = table[s[4 * i]];
        d[2 * i + 1] = table[s[4 * i + 1]];
        d[32 + 2 * i] = table[s[4 * i + 2]];
        d[32 + 2 * i + 1] = table[s[4 * i + 3]];
      }
    }
}

#endif /* KTSFT_VNNI_LAYOUT_H */
