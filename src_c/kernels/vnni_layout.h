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
 * vpdpbusd's unsigned operand needs.
 *
 * int4 (kt_z4_*): the same 16-row blocks of 64-byte units, a unit holding 8 consecutive columns
 * of each row in its 4 bytes: byte t holds column 8u + t in its low nibble and column 8u + 4 + t
 * in its high nibble, each as q + 8 (0 .. 15, offset binary), so that masking the low nibbles of
 * a unit gives the VNNI int8 unit of columns 8u .. 8u + 3 (as unsigned q + 8) and shifting by 4
 * first gives columns 8u + 4 .. 8u + 7. Padding holds q = 0 (the nibble 8). The group scales
 * stay with the caller, in the API layout [rows, ceil(cols / group)]. */
#ifndef KTSFT_VNNI_LAYOUT_H
#define KTSFT_VNNI_LAYOUT_H

#include "../internal.h"

enum {
  KT_Z_UNIT = 64, /* bytes of one unit */
};

static inline int64_t kt_z_per_unit(kt_wtype t) {
  return t == KT_WTYPE_BF16 ? 2 : t == KT_WTYPE_INT4 ? 8 : 4;
}
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
  if (t == KT_WTYPE_INT4) return (size_t)(kt_z_rows_padded(rows) * kt_z_units(cols, t)) * 4;
  const size_t data = (size_t)(kt_z_rows_padded(rows) * kt_z_units(cols, t)) * KT_Z_UNIT / 16;
  return t == KT_WTYPE_INT8 ? data + (size_t)kt_z_rows_padded(rows) * sizeof(int32_t) : data;
}

/* Byte of W[r, c] in the int4 layout, and the shift of its nibble. */
static inline size_t kt_z4_offset(int64_t units, int64_t r, int64_t c) {
  return (size_t)(((r / 16) * units + c / 8) * KT_Z_UNIT + (r % 16) * 4 + c % 4);
}
static inline int kt_z4_shift(int64_t c) { return c % 8 >= 4 ? 4 : 0; }

/* The signed value of W[r, c] of a packed int4 matrix. */
static inline int32_t kt_z4_at(const uint8_t *data, int64_t units, int64_t r, int64_t c) {
  return (int32_t)((data[kt_z4_offset(units, r, c)] >> kt_z4_shift(c)) & 15u) - 8;
}

static inline void kt_z4_pack(uint8_t *d, const uint8_t *s, int64_t rows, int64_t cols) {
  const int64_t units = kt_z_units(cols, KT_WTYPE_INT4), row = (cols + 1) / 2;
  memset(d, 0x88, kt_z_packed_bytes(rows, cols, KT_WTYPE_INT4));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) {
      const size_t at = kt_z4_offset(units, r, c);
      const unsigned u = (unsigned)(kt_int4_at(s + r * row, c) + 8);
      d[at] = (uint8_t)((d[at] & ~(15u << kt_z4_shift(c))) | (u << kt_z4_shift(c)));
    }
}

static inline void kt_z4_unpack(uint8_t *d, const uint8_t *packed, int64_t rows, int64_t cols) {
  const int64_t units = kt_z_units(cols, KT_WTYPE_INT4), row = (cols + 1) / 2;
  memset(d, 0, kt_wtype_matrix_bytes(KT_WTYPE_INT4, rows, cols));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++)
      d[r * row + c / 2] |= (uint8_t)((kt_z4_at(packed, units, r, c) & 15) << (4 * (c & 1)));
}

static inline void kt_z_pack(void *dst, const void *src, int64_t rows, int64_t cols, kt_wtype t) {
  const int64_t units = kt_z_units(cols, t);
  if (t == KT_WTYPE_INT4) {
    kt_z4_pack(dst, src, rows, cols);
    return;
  }
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
  if (t == KT_WTYPE_INT4) {
    kt_z4_unpack(dst, packed, rows, cols);
    return;
  }
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

/* The table's int4 GEMMs in plain C on this layout (the contracts of gemm_nt_q4 and gemm_nn_q4),
 * for families without their own. x W^T: each row of W and group of columns summed in int32.
 * x W: per band of KT_BLOCK_N columns, the columns of W decoded to fp32 [k, 64] in the scratch
 * (the generic family's scratch size), then each row of A, times the group scale of each column's
 * group, added up. */
static inline void kt_z4_gemm_nt_q4(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n,
                                    float *c, int64_t ldc, void *scratch) {
  (void)scratch;
  const int64_t k = w->cols, G = w->group, ng = kt_int4_groups(k, G);
  const int64_t units = kt_z_units(k, KT_WTYPE_INT4);
  for (int64_t m = 0; m < a->count; m++) {
    const int64_t i = a->index ? (int64_t)a->index[m] : m;
    const int8_t *arow = a->base + i * a->ld;
    for (int64_t j = 0; j < n; j++) {
      float total = 0.0f;
      for (int64_t g = 0; g < ng; g++) {
        int32_t acc = 0;
        for (int64_t q = g * G; q < k && q < (g + 1) * G; q++)
          acc += (int32_t)arow[q] * kt_z4_at(w->data, units, n0 + j, q);
        total += w->scale[kt_int4_scale_index(n0 + j, g, ng)] * (float)acc;
      }
      c[m * ldc + j] = a->scale[i] * total;
    }
  }
}

static inline void kt_z4_gemm_nn_q4_band(const kt_rows *a, const kt_packed *w, int64_t n0,
                                         int64_t n, float *c, int64_t ldc, void *scratch) {
  const int64_t k = w->rows, G = w->group, ng = kt_int4_groups(w->cols, G);
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT4);
  float *wf = scratch;
  for (int64_t r = 0; r < k; r++)
    for (int64_t j = 0; j < n; j++) wf[r * n + j] = (float)kt_z4_at(w->data, units, r, n0 + j);
  for (int64_t m = 0; m < a->count; m++) {
    const uint16_t *arow = kt_row(a, m);
    float *crow = c + m * ldc;
    for (int64_t j = 0; j < n; j++) crow[j] = 0.0f;
    for (int64_t r = 0; r < k; r++) {
      const float av = kt_bf16_to_f32(arow[r]);
      for (int64_t j0 = 0; j0 < n;) { /* the groups the columns n0 .. n0 + n touch */
        const int64_t g = (n0 + j0) / G, j1 = (g + 1) * G - n0 < n ? (g + 1) * G - n0 : n;
        const float f = av * w->scale[kt_int4_scale_index(r, g, ng)];
        for (int64_t j = j0; j < j1; j++) crow[j] += f * wf[r * n + j];
        j0 = j1;
      }
    }
  }
}

static inline void kt_z4_gemm_nn_q4(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n,
                                    float *c, int64_t ldc, void *scratch) {
  kt_gemm_in_bands(kt_z4_gemm_nn_q4_band, a, w, n0, n, c, ldc, scratch);
}

#endif /* KTSFT_VNNI_LAYOUT_H */
