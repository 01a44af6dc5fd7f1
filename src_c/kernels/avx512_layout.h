/* avx512_layout.h - zmm helpers shared by the avx512 family's kernel files (static inline
 * only: each file is compiled with its own flags). The layout is vnni_layout.h's. */
#ifndef KTSFT_AVX512_LAYOUT_H
#define KTSFT_AVX512_LAYOUT_H

#include <immintrin.h>

#include "vnni_layout.h"

enum {
  KT_Z_NT_MR = 12,        /* rows of A per x W^T register tile (12 x 32 outputs) */
  KT_Z_PANEL_TILE = 1024, /* bytes of one tile of a column-pair panel: 16 units */
  KT_Z_PANEL_AHEAD = 8,   /* blocks of W a panel's reads are fetched ahead */
  /* x W^T tiles of at least this many rows spend long enough on each unit that the hardware
   * prefetchers, restarting at every 4 KB page, fall behind: they fetch their stream this many
   * units (16 KB) ahead into L2. Fewer rows stream faster without (one thread, from DRAM). */
  KT_Z_PREFETCH_MR = 6,
  KT_Z_PREFETCH_UNITS = 256,
};

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
  KT_UNROLL
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  KT_UNROLL
  for (int i = 0; i < 4; i++) { /* s[4i + c]: rows 4i..4i+3, column c of each 128-bit lane */
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  KT_UNROLL
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
  KT_UNROLL
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Eight tile rows from the eight bf16 units of 16 columns of one 16-row block of W: unit v holds
 * W[row 2p + e, column 2v + j'] in qword p as words (e, j') = 00, 01, 10, 11, tile row p wants
 * the pairs (j', e) of every unit in unit order: an 8 x 8 transpose of qwords, the middle words
 * of each swapped on the way. Port 5 does the shuffles; the last stage is two half stores. */
static inline void kt_z_tile_rows_bf16(const char *src, char *dst) {
  /* word 4 i + w of the result: qword 2 (i / 2) (even) or 2 (i / 2) + 1 (odd) of unit pair
   * member i % 2, word (0, 2, 1, 3)[w] */
  const __m512i even =
      _mm512_setr_epi32(0x00020000, 0x00030001, 0x00220020, 0x00230021, 0x000a0008, 0x000b0009,
                        0x002a0028, 0x002b0029, 0x00120010, 0x00130011, 0x00320030, 0x00330031,
                        0x001a0018, 0x001b0019, 0x003a0038, 0x003b0039);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(4));
  __m512i r[8];
  KT_UNROLL
  for (int u = 0; u < 8; u++) r[u] = _mm512_loadu_si512((const void *)(src + u * KT_Z_UNIT));
  /* qwords (0, 2, 4, 6) and (1, 3, 5, 7) of unit pairs, then of unit quadruples */
  const __m512i t0 = _mm512_permutex2var_epi16(r[0], even, r[1]);
  const __m512i t1 = _mm512_permutex2var_epi16(r[0], odd, r[1]);
  const __m512i t2 = _mm512_permutex2var_epi16(r[2], even, r[3]);
  const __m512i t3 = _mm512_permutex2var_epi16(r[2], odd, r[3]);
  const __m512i t4 = _mm512_permutex2var_epi16(r[4], even, r[5]);
  const __m512i t5 = _mm512_permutex2var_epi16(r[4], odd, r[5]);
  const __m512i t6 = _mm512_permutex2var_epi16(r[6], even, r[7]);
  const __m512i t7 = _mm512_permutex2var_epi16(r[6], odd, r[7]);
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const __m512i q[8] = {
      _mm512_permutex2var_epi64(t0, lo, t2), _mm512_permutex2var_epi64(t1, lo, t3),
      _mm512_permutex2var_epi64(t0, hi, t2), _mm512_permutex2var_epi64(t1, hi, t3),
      _mm512_permutex2var_epi64(t4, lo, t6), _mm512_permutex2var_epi64(t5, lo, t7),
      _mm512_permutex2var_epi64(t4, hi, t6), _mm512_permutex2var_epi64(t5, hi, t7)};
  /* q[p] (units 0-3) and q[4 + p] (units 4-7) hold qwords p (low half) and p + 4 (high half) */
  KT_UNROLL
  for (int p = 0; p < 4; p++) {
    char *row = dst + p * KT_Z_UNIT, *row4 = row + 4 * KT_Z_UNIT;
    _mm256_storeu_si256((__m256i *)(void *)row, _mm512_castsi512_si256(q[p]));
    _mm256_storeu_si256((__m256i *)(void *)(row + 32), _mm512_castsi512_si256(q[4 + p]));
    _mm256_storeu_si256((__m256i *)(void *)row4, _mm512_extracti64x4_epi64(q[p], 1));
    _mm256_storeu_si256((__m256i *)(void *)(row4 + 32), _mm512_extracti64x4_epi64(q[4 + p], 1));
  }
}

/* The column-pair panel of a bf16 W (x W on pair instructions: the B tiles of tdpbf16ps, the
 * operand of vdpbf16ps): for each 16 columns t = t_first .. t_last of W and block cb of 32 rows,
 * a 1 KB tile whose row p (64 bytes) holds, for column 16 t + j, the pair W[32 cb + 2p + {0, 1},
 * 16 t + j]; tile (t, cb) at ((t - t_first) ncb + cb) KB. Built from whole units: the packed rows
 * are padded to 16 and the units of a block row to cover every tile column, with zeros;
 * reduction blocks past the padded rows are zero. Walks the source in its order (block, then
 * unit). */
static inline void kt_z_panel_bf16(const kt_packed *w, int64_t t_first, int64_t t_last, int64_t ncb,
                                   char *panel) {
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_BF16);
  const int64_t blocks = kt_z_rows_padded(w->rows) / 16;
  for (int64_t b = 0; b < 2 * ncb; b++) {
    /* short runs far apart (the band of each block): fetch ahead into L2 */
    if (b + KT_Z_PANEL_AHEAD < blocks)
      for (int64_t l = 8 * t_first; l < 8 * (t_last + 1); l++)
        _mm_prefetch(kt_z_unit_ptr(w->data, units, b + KT_Z_PANEL_AHEAD, l), _MM_HINT_T1);
    for (int64_t t = t_first; t <= t_last; t++) {
      char *dst = panel + ((t - t_first) * ncb + b / 2) * KT_Z_PANEL_TILE + (b % 2) * 8 * KT_Z_UNIT;
      if (b < blocks)
        kt_z_tile_rows_bf16(kt_z_unit_ptr(w->data, units, b, 8 * t), dst);
      else
        memset(dst, 0, 8 * KT_Z_UNIT);
    }
  }
}
/* Scratch of x W on vdpbf16ps (avx512_nt_dp.h) for n <= KT_BLOCK_N columns and k rows of W:
 * the panel of the band (4 tile columns) and KT_Z_NT_MR rows of A, aligned. */
static inline size_t kt_nn_dp_scratch_bytes(int64_t k) {
  const int64_t ncb = (k + 31) / 32;
  return (size_t)(4 * ncb * KT_Z_PANEL_TILE + KT_Z_NT_MR * 32 * ncb * 2 + KT_CACHE_LINE);
}

#endif /* KTSFT_AVX512_LAYOUT_H */
