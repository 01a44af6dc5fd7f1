/* gemm_amx.c - GEMMs on AMX tiles: tdpbf16ps for bf16, tdpbssd for int8.
 *
 * Built twice: with -mamx-tile -mamx-bf16 -mamx-int8 as the `amx` family, and with
 * KT_AMX_EMULATE against the software model of amx_emu.c as `amx-emu`, so that this exact
 * source is tested on machines without AMX.
 *
 * Packed layout: the avx512 family's (vnni_layout.h). For "x W^T", W [N, K], its 16-row blocks
 * of 64-byte units, 16 units per K block (32 bf16 or 64 int8), are exactly the 1 KiB B tiles
 * tdp* reads: tile row p, column n holds W[n, VNNI p .. VNNI p + VNNI - 1] (VNNI = 2 for bf16,
 * 4 for int8), tiles ordered by row block, then K block, zero-padded (the int8 row sums that
 * follow the data are avx512's and unused here). One layout lets the native family hand work
 * to the avx512 kernels where tiles do not pay off: x W^T and x W of fewer rows of A than a tile,
 * x W of int8 and fp8 W (see below), the LoRA products and the activations. amx-emu keeps every
 * product on tiles, so the model covers all of them.
 *
 * "x W" (the backward) multiplies by the transpose of the
 * same packed copy: each call builds the VNNI tiles of W[:, n0:n0+n]^T in its scratch (a panel of
 * at most 5 x 16 columns), never a second copy of W. For int8 W the row scale multiplies A in fp32,
 * and the fp32 product is split exactly into three bf16 parts hi + mid + lo (8 significant bits
 * each), each multiplied by the same B tiles into the same fp32 accumulator: the products are exact
 * and only the fp32 accumulation rounds, as in the generic twin (parts below FLT_MIN are flushed,
 * as tdpbf16ps flushes denormals).
 *
 * Every tile has one shape, 16 rows x 64 bytes, so one configuration serves all GEMMs; it is
 * loaded once per thread (and again only if other code on the thread changed it), and released
 * when the thread exits. Tiles: tmm0-3 accumulators (2 x 2), tmm4-5 A, tmm6-7 B. */
#include <math.h>
#include <pthread.h>

#include "../internal.h"
#include "vnni_layout.h"

#ifdef KT_AMX_EMULATE
#include "amx_emu.h"
#define thread_faults() kt_amx_emu_thread_faults()
#else
#include "avx512_layout.h"
#define thread_faults() ((uint64_t)0)
#endif

enum {
  TILE_ROWS = 16,
  TILE_COLSB = 64,
  TILE_BYTES = TILE_ROWS * TILE_COLSB,
  BLOCK_M = 2 * TILE_ROWS, /* rows of A per pass: two A tiles */
  K_BF16 = 32,             /* K elements of one bf16 tile row */
  K_I8 = 64,
  NN_PARTS = 3 /* bf16 parts of an fp32 value */
};

typedef enum kind { KIND_BF16, KIND_I8 } kind;

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ---- tile configuration, once per thread --------------------------------------------------- */

typedef struct tile_config {
  uint8_t palette, start_row, reserved0[14];
  uint16_t colsb[8];
  uint8_t reserved1[16];
  uint8_t rows[8];
  uint8_t reserved2[8];
} tile_config;

static pthread_key_t release_key;
static pthread_once_t release_once = PTHREAD_ONCE_INIT;
static __thread int configured;

static void release_tiles(void *unused) {
  (void)unused;
  _tile_release(); /* leave the init state behind: configured tiles block deep C-states */
}

static void make_release_key(void) { (void)pthread_key_create(&release_key, release_tiles); }

static void configure_tiles(void) {
  static const tile_config want = {
      .palette = 1,
      .colsb = {TILE_COLSB, TILE_COLSB, TILE_COLSB, TILE_COLSB, TILE_COLSB, TILE_COLSB, TILE_COLSB,
                TILE_COLSB},
      .rows = {TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS,
               TILE_ROWS},
  };
  if (configured) {
    tile_config now;
    _tile_storeconfig(&now);
    if (memcmp(&now, &want, sizeof now) == 0) return;
  } else {
    pthread_once(&release_once, make_release_key);
    (void)pthread_setspecific(release_key, &configured);
    configured = 1;
  }
  _tile_loadconfig(&want);
}

/* ---- scratch ------------------------------------------------------------------------------- */

/* Output tiles that columns [n0, n0 + n) touch: at most ceil(n / 16) + 1. */
static int64_t max_out_tiles(int64_t n) { return ceil_div(n, TILE_ROWS) + 1; }

/* The kernels that run what tiles do not: avx512's for this CPU (natively), the generic LoRA
 * products (amx-emu, which needs no AVX-512). */
#ifdef KT_AMX_EMULATE
static size_t twin_scratch_bytes(int64_t n, int64_t k) {
  return kt_generic_gemm_scratch_bytes(n, k);
}
#else
static const kt_kernels *avx512_twin;
static pthread_once_t twin_once = PTHREAD_ONCE_INIT;
static void find_twin(void) { avx512_twin = kt_kernels_avx512(kt_cpu_features()); }
static const kt_kernels *twin(void) {
  pthread_once(&twin_once, find_twin);
  return avx512_twin;
}
static size_t twin_scratch_bytes(int64_t n, int64_t k) { return twin()->gemm_scratch_bytes(n, k); }
#endif

static size_t q4_scratch_bytes(int64_t k);

static size_t amx_gemm_scratch_bytes(int64_t n, int64_t k) {
  const int64_t kp2 = ceil_div(k, K_BF16) * K_BF16, kp4 = ceil_div(k, K_I8) * K_I8;
  const int64_t nt = BLOCK_M * (kp2 * 2 > kp4 ? kp2 * 2 : kp4);
  const int64_t nn = max_out_tiles(n) * (kp2 / K_BF16) * TILE_BYTES + NN_PARTS * BLOCK_M * kp2 * 2;
  const size_t own = (size_t)((nt > nn ? nt : nn) + TILE_BYTES + KT_CACHE_LINE);
  return kt_max_size(kt_max_size(own, q4_scratch_bytes(k)), twin_scratch_bytes(n, k));
}

static char *align_scratch(void *scratch) {
  const uintptr_t p = (uintptr_t)scratch;
  return (char *)((p + KT_CACHE_LINE - 1) & ~(uintptr_t)(KT_CACHE_LINE - 1));
}

/* ---- the tile loop ------------------------------------------------------------------------- */

/* Accumulates into tmm0-3 the product of a block of A (1 or 2 tiles of rows, `parts` copies
 * lda_bytes * BLOCK_M apart, row stride lda_bytes) and 1 or 2 columns of B tiles (b1 NULL for
 * one), over nkb K blocks; B tiles of one column are TILE_BYTES apart. */
static void tile_block(kind kd, const char *a, int64_t lda_bytes, int two_m, int parts,
                       const char *b0, const char *b1, int64_t nkb) {
  const int64_t part_bytes = lda_bytes * BLOCK_M;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < nkb; kb++) {
    _tile_loadd(6, b0 + kb * TILE_BYTES, TILE_COLSB);
    if (b1) _tile_loadd(7, b1 + kb * TILE_BYTES, TILE_COLSB);
    KT_UNROLL
    for (int p = 0; p < parts; p++) {
      const char *ak = a + p * part_bytes + kb * TILE_COLSB;
      _tile_loadd(4, ak, lda_bytes);
      if (two_m) _tile_loadd(5, ak + TILE_ROWS * lda_bytes, lda_bytes);
      if (kd == KIND_I8) {
        _tile_dpbssd(0, 4, 6);
        if (b1) _tile_dpbssd(1, 4, 7);
        if (two_m) _tile_dpbssd(2, 5, 6);
        if (two_m && b1) _tile_dpbssd(3, 5, 7);
      } else {
        _tile_dpbf16ps(0, 4, 6);
        if (b1) _tile_dpbf16ps(1, 4, 7);
        if (two_m) _tile_dpbf16ps(2, 5, 6);
        if (two_m && b1) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
}

/* How a 16 x 16 accumulator tile becomes C: fp32 as it is, or int32 times both int8 scales. */
typedef struct epilogue {
  kind kd;
  const float *a_scale; /* int8 "x W^T": per A row (after indexing) */
  const int32_t *a_index;
  const float *w_scale; /* int8 "x W^T": per output column (row of W) */
} epilogue;

static void store_tile(int t, char *buf) {
  switch (t) {
    case 0: _tile_stored(0, buf, TILE_COLSB); break;
    case 1: _tile_stored(1, buf, TILE_COLSB); break;
    case 2: _tile_stored(2, buf, TILE_COLSB); break;
    default: _tile_stored(3, buf, TILE_COLSB); break;
  }
}

/* Writes C[m0 + i, col - n0] for the rows i < rows and the tile's columns inside [n0, n0 + n);
 * tile_col0 is the output column of the tile's column 0. */
static void write_tile(const epilogue *ep, const char *buf, int64_t m0, int64_t rows,
                       int64_t tile_col0, int64_t n0, int64_t n, float *c, int64_t ldc) {
  const int64_t j0 = tile_col0 < n0 ? n0 - tile_col0 : 0;
  const int64_t j1 = tile_col0 + TILE_ROWS > n0 + n ? n0 + n - tile_col0 : TILE_ROWS;
  for (int64_t i = 0; i < rows; i++) {
    float *crow = c + (m0 + i) * ldc + (tile_col0 - n0);
    if (ep->kd == KIND_I8) {
      const int32_t *acc = (const int32_t *)(const void *)(buf + i * TILE_COLSB);
      const int64_t ai = ep->a_index ? (int64_t)ep->a_index[m0 + i] : m0 + i;
      const float sa = ep->a_scale[ai];
      for (int64_t j = j0; j < j1; j++) crow[j] = sa * ep->w_scale[tile_col0 + j] * (float)acc[j];
    } else {
      const float *acc = (const float *)(const void *)(buf + i * TILE_COLSB);
      for (int64_t j = j0; j < j1; j++) crow[j] = acc[j];
    }
  }
}

/* If the model faulted since `faults` was read, says so in C [M, n] (NaN), not with garbage. */
static void poison_on_fault(uint64_t faults, int64_t M, int64_t n, float *c, int64_t ldc) {
  if (thread_faults() != faults)
    for (int64_t m = 0; m < M; m++)
      for (int64_t j = 0; j < n; j++) c[m * ldc + j] = NAN;
}

/* C[0:M, 0:n] over output columns [n0, n0 + n): A blocks come from fill_a (BLOCK_M rows of
 * lda_bytes each, `parts` copies), B tiles of output tile column t start at b + t * b_col_bytes
 * (t counted from tile column t_base). */
typedef void (*fill_a_fn)(const void *ctx, int64_t m0, int64_t rows, char *abuf);

static void run_gemm(kind kd, int64_t M, fill_a_fn fill_a, const void *actx, int64_t lda_bytes,
                     int parts, const char *b, int64_t b_col_bytes, int64_t t_base, int64_t nkb,
                     const epilogue *ep, int64_t n0, int64_t n, float *c, int64_t ldc, char *abuf,
                     char *cbuf) {
  const uint64_t faults = thread_faults();
  configure_tiles();
  const int64_t t_first = n0 / TILE_ROWS, t_last = (n0 + n - 1) / TILE_ROWS;
  for (int64_t m0 = 0; m0 < M; m0 += BLOCK_M) {
    const int64_t rows = M - m0 < BLOCK_M ? M - m0 : BLOCK_M;
    const int two_m = rows > TILE_ROWS;
    fill_a(actx, m0, rows, abuf);
    for (int64_t t = t_first; t <= t_last; t += 2) {
      const int two_n = t + 1 <= t_last;
      const char *b0 = b + (t - t_base) * b_col_bytes;
      tile_block(kd, abuf, lda_bytes, two_m, parts, b0, two_n ? b0 + b_col_bytes : NULL, nkb);
      KT_UNROLL
      for (int q = 0; q < 4; q++) {
        const int mi = q / 2, ni = q % 2;
        if ((mi && !two_m) || (ni && !two_n)) continue;
        store_tile(q, cbuf);
        const int64_t r0 = m0 + mi * TILE_ROWS, nr = rows - mi * TILE_ROWS;
        write_tile(ep, cbuf, r0, nr < TILE_ROWS ? nr : TILE_ROWS, (t + ni) * TILE_ROWS, n0, n, c,
                   ldc);
      }
    }
  }
  poison_on_fault(faults, M, n, c, ldc);
}

/* ---- "x W^T" ------------------------------------------------------------------------------- */

typedef struct a_bf16_ctx {
  const kt_rows *a;
  int64_t k, kp; /* row length and its padded length in elements */
} a_bf16_ctx;

static void fill_a_bf16(const void *vctx, int64_t m0, int64_t rows, char *abuf) {
  const a_bf16_ctx *x = vctx;
  uint16_t *dst = (uint16_t *)(void *)abuf;
  const int64_t filled = rows > TILE_ROWS ? BLOCK_M : TILE_ROWS;
  for (int64_t i = 0; i < filled; i++) {
    uint16_t *row = dst + i * x->kp;
    int64_t c = 0;
    if (i < rows) {
      memcpy(row, kt_row(x->a, m0 + i), (size_t)x->k * 2);
      c = x->k;
    }
    memset(row + c, 0, (size_t)(x->kp - c) * 2);
  }
}

static void amx_gemm_nt(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                        int64_t ldc, void *scratch) {
#ifndef KT_AMX_EMULATE
  if (a->count < TILE_ROWS) {
    twin()->gemm_nt(a, w, n0, n, c, ldc, scratch);
    return;
  }
#endif
  const int64_t nkb = ceil_div(w->cols, K_BF16);
  char *abuf = align_scratch(scratch), *cbuf = abuf + BLOCK_M * nkb * TILE_COLSB;
  const a_bf16_ctx x = {a, w->cols, nkb * K_BF16};
  const epilogue ep = {KIND_BF16, NULL, NULL, NULL};
  run_gemm(KIND_BF16, a->count, fill_a_bf16, &x, nkb * TILE_COLSB, 1, w->data, nkb * TILE_BYTES, 0,
           nkb, &ep, n0, n, c, ldc, abuf, cbuf);
}

typedef struct a_q8_ctx {
  const kt_rows_q8 *a;
  int64_t k, kp;
} a_q8_ctx;

static void fill_a_q8(const void *vctx, int64_t m0, int64_t rows, char *abuf) {
  const a_q8_ctx *x = vctx;
  const int64_t filled = rows > TILE_ROWS ? BLOCK_M : TILE_ROWS;
  for (int64_t i = 0; i < filled; i++) {
    char *row = abuf + i * x->kp;
    int64_t c = 0;
    if (i < rows) {
      const int64_t ai = x->a->index ? (int64_t)x->a->index[m0 + i] : m0 + i;
      memcpy(row, x->a->base + ai * x->a->ld, (size_t)x->k);
      c = x->k;
    }
    memset(row + c, 0, (size_t)(x->kp - c));
  }
}

static void amx_gemm_nt_q8(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                           int64_t ldc, void *scratch) {
#ifndef KT_AMX_EMULATE
  if (a->count < TILE_ROWS) {
    twin()->gemm_nt_q8(a, w, n0, n, c, ldc, scratch);
    return;
  }
#endif
  const int64_t nkb = ceil_div(w->cols, K_I8);
  char *abuf = align_scratch(scratch), *cbuf = abuf + BLOCK_M * nkb * TILE_COLSB;
  const a_q8_ctx x = {a, w->cols, nkb * K_I8};
  const epilogue ep = {KIND_I8, a->scale, a->index, w->scale};
  run_gemm(KIND_I8, a->count, fill_a_q8, &x, nkb * TILE_COLSB, 1, w->data, nkb * TILE_BYTES, 0, nkb,
           &ep, n0, n, c, ldc, abuf, cbuf);
}

/* ---- int4 "x W^T" (W4A8) ------------------------------------------------------------------- */
/* The int4 units (vnni_layout.h) of a K block of 64 columns, 8 per 16-row block of W, become one
 * signed int8 B tile in the scratch: unit v's low nibbles minus 8 are tile row 2v, its high
 * nibbles row 2v + 1. Every group of G columns is its own product on tmm0-3 (G / 64 K blocks;
 * G = 32: half a K block, the other group's 8 tile rows zero), then C += group scale * (float)
 * int32 sum in fp32, group by group; the row scale of A last, as in the contract. */

/* B tiles of a group: G = 32 and 64 take one, 128 two. */
static int64_t q4_tiles_per_group(int64_t group) { return group == 32 ? 1 : group / K_I8; }

/* The B tiles of group g of the 16 rows of W in block t (tpg tiles, TILE_BYTES apart), and the
 * group scales of those rows (zero past the last row). */
static void q4_group_tiles(const kt_packed *w, int64_t t, int64_t g, int8_t *tiles, float *scale) {
  const int64_t G = w->group, tpg = q4_tiles_per_group(G), ng = kt_int4_groups(w->cols, G);
  const int64_t units = kt_z_units(w->cols, KT_WTYPE_INT4), r0 = t * TILE_ROWS;
  memcpy(scale, w->scale + kt_int4_scale_index(r0, g, ng), TILE_ROWS * sizeof(float));
  for (int64_t s = 0; s < tpg; s++) {
    const int64_t kb = G == 32 ? g / 2 : g * tpg + s; /* the K block of this tile */
    int8_t *tile = tiles + s * TILE_BYTES;
    for (int64_t v = 0; v < 8; v++) {
      int8_t *lo = tile + 2 * v * TILE_COLSB, *hi = lo + TILE_COLSB;
      if (G == 32 && v / 4 != g % 2) { /* the other group's columns */
        memset(lo, 0, 2 * TILE_COLSB);
        continue;
      }
      const uint8_t *src = (const uint8_t *)kt_z_unit_ptr(w->data, units, t, 8 * kb + v);
      KT_UNROLL
      for (int i = 0; i < TILE_COLSB; i++) {
        lo[i] = (int8_t)((src[i] & 15) - 8);
        hi[i] = (int8_t)((src[i] >> 4) - 8);
      }
    }
  }
}

/* acc[i, j] += scale[j] * (float)sum[i, j] over a stored int32 tile (acc rows 2 tiles wide). */
static inline void q4_accumulate(const char *sums, const float *scale, float *acc) {
#ifdef KT_AMX_EMULATE
  KT_UNROLL
  for (int i = 0; i < TILE_ROWS; i++) {
    const int32_t *sum = (const int32_t *)(const void *)(sums + i * TILE_COLSB);
    KT_UNROLL
    for (int j = 0; j < TILE_ROWS; j++) acc[i * 2 * TILE_ROWS + j] += scale[j] * (float)sum[j];
  }
#else
  const __m512 s = _mm512_loadu_ps(scale);
  KT_UNROLL
  for (int i = 0; i < TILE_ROWS; i++) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(sums + i * TILE_COLSB)));
    float *row = acc + i * 2 * TILE_ROWS;
    _mm512_storeu_ps(row, _mm512_fmadd_ps(s, v, _mm512_loadu_ps(row)));
  }
#endif
}

/* Rows of A per pass of amx_gemm_nt_q4: the B tiles of a group are decoded once per pass. */
enum { Q4_CHUNK_M = 4 * BLOCK_M };

/* Scratch of amx_gemm_nt_q4 for reductions of length k: the A rows of a pass, two columns of B
 * tiles of one group, a stored tile, the fp32 sums of a pass and the scales of one group. */
static size_t q4_scratch_bytes(int64_t k) {
  const int64_t a = Q4_CHUNK_M * ceil_div(k, K_I8) * K_I8;
  return (size_t)(a + 5 * TILE_BYTES + (Q4_CHUNK_M + 1) * 2 * TILE_ROWS * 4 + KT_CACHE_LINE);
}

static void amx_gemm_nt_q4(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                           int64_t ldc, void *scratch) {
#ifndef KT_AMX_EMULATE
  if (a->count < TILE_ROWS) {
    twin()->gemm_nt_q4(a, w, n0, n, c, ldc, scratch);
    return;
  }
#endif
  const uint64_t faults = thread_faults();
  const int64_t G = w->group, ng = kt_int4_groups(w->cols, G), tpg = q4_tiles_per_group(G);
  const int64_t kp = ceil_div(w->cols, K_I8) * K_I8;
  const int64_t t_first = n0 / TILE_ROWS, t_last = (n0 + n - 1) / TILE_ROWS;
  char *abuf = align_scratch(scratch);
  int8_t *btiles = (int8_t *)(void *)(abuf + Q4_CHUNK_M * kp); /* [2 columns][tpg] */
  char *cbuf = (char *)btiles + 4 * TILE_BYTES;
  float *acc = (float *)(void *)(cbuf + TILE_BYTES); /* [Q4_CHUNK_M, 2 tiles] */
  float *st = acc + Q4_CHUNK_M * 2 * TILE_ROWS;      /* group scales of the two tile columns */
  const a_q8_ctx x = {a, w->cols, kp};
  configure_tiles();
  for (int64_t m0 = 0; m0 < a->count; m0 += Q4_CHUNK_M) {
    const int64_t rows = a->count - m0 < Q4_CHUNK_M ? a->count - m0 : Q4_CHUNK_M;
    const int64_t nblk = ceil_div(rows, BLOCK_M);
    for (int64_t mb = 0; mb < nblk; mb++) {
      const int64_t r = rows - mb * BLOCK_M;
      fill_a_q8(&x, m0 + mb * BLOCK_M, r < BLOCK_M ? r : BLOCK_M, abuf + mb * BLOCK_M * kp);
    }
    for (int64_t t = t_first; t <= t_last; t += 2) {
      const int two_n = t + 1 <= t_last;
      memset(acc, 0, (size_t)Q4_CHUNK_M * 2 * TILE_ROWS * 4);
      for (int64_t g = 0; g < ng; g++) {
        const int64_t kb = G == 32 ? g / 2 : g * tpg;
        q4_group_tiles(w, t, g, btiles, st);
        if (two_n) q4_group_tiles(w, t + 1, g, btiles + tpg * TILE_BYTES, st + TILE_ROWS);
        for (int64_t mb = 0; mb < nblk; mb++) {
          const int two_m = rows - mb * BLOCK_M > TILE_ROWS;
          tile_block(KIND_I8, abuf + mb * BLOCK_M * kp + kb * TILE_COLSB, kp, two_m, 1,
                     (const char *)btiles, two_n ? (const char *)(btiles + tpg * TILE_BYTES) : NULL,
                     tpg);
          KT_UNROLL
          for (int q = 0; q < 4; q++) {
            const int mi = q / 2, ni = q % 2;
            if ((mi && !two_m) || (ni && !two_n)) continue;
            store_tile(q, cbuf);
            q4_accumulate(cbuf, st + ni * TILE_ROWS,
                          acc + (mb * BLOCK_M + mi * TILE_ROWS) * 2 * TILE_ROWS + ni * TILE_ROWS);
          }
        }
      }
      /* the row scale of A, into C's columns of these tiles before n0 + n (n0 is a multiple
       * of KT_BLOCK_N, so the first tile starts at n0) */
      const int64_t t0 = t * TILE_ROWS, end = t0 + (two_n ? 2 : 1) * TILE_ROWS;
      const int64_t j1 = (end < n0 + n ? end : n0 + n) - t0;
      for (int64_t i = 0; i < rows; i++) {
        const float sa = a->scale[a->index ? (int64_t)a->index[m0 + i] : m0 + i];
        float *crow = c + (m0 + i) * ldc + (t0 - n0);
        for (int64_t j = 0; j < j1; j++) crow[j] = sa * acc[i * 2 * TILE_ROWS + j];
      }
    }
  }
  poison_on_fault(faults, a->count, n, c, ldc);
}

/* ---- "x W" --------------------------------------------------------------------------------- */
/* Natively only for bf16 W and at least TILE_ROWS rows of A, with the panel built by AVX-512
 * shuffles (kt_z_panel_bf16 of avx512_layout.h): an int8 or fp8 W takes three tile products per A
 * value (split3 below), and the avx512 x W runs those, and fewer rows, instead. amx-emu keeps every
 * x W on tiles, with the panel built element by element, so the model covers all of them. */

#ifdef KT_AMX_EMULATE
/* The VNNI tiles of W[:, t_first*16 : (t_last+1)*16]^T: for output tile column t and reduction
 * block cb (32 rows of W), tile row p, column j holds W[32 cb + 2p + {0, 1}, 16 t + j] as bf16
 * (int8 and e4m3 values are exact in bf16); zero outside W. */
static void build_panel(const kt_packed *w, int64_t t_first, int64_t t_last, int64_t ncb,
                        uint16_t *panel) {
  const int v = (int)kt_z_per_unit(w->wtype); /* elements per 32-bit VNNI group */
  const int64_t units = kt_z_units(w->cols, w->wtype), esize = kt_wtype_size(w->wtype);
  memset(panel, 0, (size_t)((t_last - t_first + 1) * ncb) * TILE_BYTES);
  for (int64_t t = t_first; t <= t_last; t++) {
    const int64_t j1 = w->cols - t * TILE_ROWS < TILE_ROWS ? w->cols - t * TILE_ROWS : TILE_ROWS;
    uint16_t *col = panel + (t - t_first) * ncb * (TILE_BYTES / 2);
    for (int64_t r = 0; r < w->rows; r++) {
      uint16_t *dst = col + (r / K_BF16) * (TILE_BYTES / 2) + ((r % K_BF16) / 2) * K_BF16 + r % 2;
      /* the 16 columns share a tile; element offset of W[r, 16 t] */
      const size_t at = kt_z_offset(units, r, t * TILE_ROWS, w->wtype) / (size_t)esize;
      if (w->wtype == KT_WTYPE_INT8) {
        const int8_t *src = (const int8_t *)w->data + at;
        for (int64_t j = 0; j < j1; j++)
          dst[2 * j] = kt_f32_to_bf16((float)src[(j / v) * TILE_ROWS * v + j % v]);
      } else if (w->wtype == KT_WTYPE_FP8) {
        const uint8_t *src = (const uint8_t *)w->data + at;
        for (int64_t j = 0; j < j1; j++)
          dst[2 * j] = kt_e4m3_to_bf16(src[(j / v) * TILE_ROWS * v + j % v]);
      } else {
        const uint16_t *src = (const uint16_t *)w->data + at;
        for (int64_t j = 0; j < j1; j++) dst[2 * j] = src[(j / v) * TILE_ROWS * v + j % v];
      }
    }
  }
}
#endif

typedef struct a_nn_ctx {
  const kt_rows *a;
  const float *scale; /* row scales of W (int8, fp8 panels), folded into A in fp32 and split in
                       * three parts */
  int64_t k, kp;
} a_nn_ctx;

/* f = hi + mid + lo exactly, each a bf16: hi and mid keep the top 8 significant bits of f and of
 * the remainder (truncation: exact remainders, and no overflow to infinity), lo the last 8.
 * Non-finite f: hi carries it (rounded, so a NaN stays NaN), the other parts are zero. */
static uint16_t bf16_trunc(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)(u >> 16);
}

static void split3(float f, uint16_t *hi, uint16_t *mid, uint16_t *lo) {
  if (!isfinite(f)) {
    *hi = kt_f32_to_bf16(f);
    *mid = *lo = 0;
    return;
  }
  *hi = bf16_trunc(f);
  const float r = f - kt_bf16_to_f32(*hi);
  *mid = bf16_trunc(r);
  *lo = bf16_trunc(r - kt_bf16_to_f32(*mid));
}

static void fill_a_nn(const void *vctx, int64_t m0, int64_t rows, char *abuf) {
  const a_nn_ctx *x = vctx;
  if (!x->scale) {
    const a_bf16_ctx plain = {x->a, x->k, x->kp};
    fill_a_bf16(&plain, m0, rows, abuf);
    return;
  }
  uint16_t *hi = (uint16_t *)(void *)abuf, *mid = hi + BLOCK_M * x->kp, *lo = mid + BLOCK_M * x->kp;
  const int64_t filled = rows > TILE_ROWS ? BLOCK_M : TILE_ROWS;
  for (int64_t i = 0; i < filled; i++) {
    const int64_t o = i * x->kp;
    int64_t c = 0;
    if (i < rows) {
      const uint16_t *src = kt_row(x->a, m0 + i);
      for (; c < x->k; c++)
        split3(kt_bf16_to_f32(src[c]) * x->scale[c], hi + o + c, mid + o + c, lo + o + c);
    }
    for (; c < x->kp; c++) hi[o + c] = mid[o + c] = lo[o + c] = 0;
  }
}

static void amx_gemm_nn(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                        int64_t ldc, void *scratch) {
  const int scaled = w->scale != NULL; /* int8, or a bf16 panel of fp8 */
#ifndef KT_AMX_EMULATE
  if (scaled || w->wtype != KT_WTYPE_BF16 || a->count < TILE_ROWS) {
    twin()->gemm_nn(a, w, n0, n, c, ldc, scratch);
    return;
  }
#endif
  const int64_t ncb = ceil_div(w->rows, K_BF16), kp = ncb * K_BF16;
  const int64_t t_first = n0 / TILE_ROWS, t_last = (n0 + n - 1) / TILE_ROWS;
  char *panel = align_scratch(scratch);
  char *abuf = panel + (t_last - t_first + 1) * ncb * TILE_BYTES;
  char *cbuf = abuf + (scaled ? NN_PARTS : 1) * BLOCK_M * kp * 2;
#ifdef KT_AMX_EMULATE
  build_panel(w, t_first, t_last, ncb, (uint16_t *)(void *)panel);
#else
  kt_z_panel_bf16(w, t_first, t_last, ncb, panel);
#endif
  const a_nn_ctx x = {a, w->scale, w->rows, kp};
  const epilogue ep = {KIND_BF16, NULL, NULL, NULL};
  run_gemm(KIND_BF16, a->count, fill_a_nn, &x, kp * 2, scaled ? NN_PARTS : 1, panel,
           ncb * TILE_BYTES, t_first, ncb, &ep, n0, n, c, ldc, abuf, cbuf);
}

#ifdef KT_AMX_EMULATE
const kt_kernels kt_kernels_amx_emu = {
    .isa = KT_ISA_AMX_EMU,
    .variant = "amx-emu",
    .packed_bytes = kt_z_packed_bytes,
    .pack = kt_z_pack,
    .unpack = kt_z_unpack,
    .gemm_scratch_bytes = amx_gemm_scratch_bytes,
    .gemm_nt = amx_gemm_nt,
    .decode_fp8 = kt_z_decode_fp8,
    .gemm_nt_q8 = amx_gemm_nt_q8,
    .gemm_nn = amx_gemm_nn,
    .gemm_nt_q4 = amx_gemm_nt_q4,
    .gemm_nn_q4 = kt_z4_gemm_nn_q4,
    .sigmoid = kt_act_generic_sigmoid,
    .silu = kt_act_generic_silu,
    .store_bf16 = kt_store_bf16,
    /* The rank-r LoRA products are too narrow for 16-row tiles: the generic ones. */
    .lora_nt = kt_lora_generic_nt,
    .lora_nn = kt_lora_generic_nn,
    .lora_add_nt = kt_lora_add_nt,
    .lora_add_nn = kt_lora_add_nn,
    .outer_rn = kt_outer_rn,
    .outer_nr = kt_outer_nr,
};
#else
static kt_kernels amx_table;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

/* The avx512 table of this CPU (layout, x W, LoRA products, activations) with the tile x W^T. */
static void make_table(void) {
  amx_table = *twin();
  amx_table.isa = KT_ISA_AMX;
  amx_table.variant = "amx";
  amx_table.gemm_scratch_bytes = amx_gemm_scratch_bytes;
  amx_table.gemm_nt = amx_gemm_nt;
  amx_table.gemm_nt_q8 = amx_gemm_nt_q8;
  amx_table.gemm_nn = amx_gemm_nn;
  amx_table.gemm_nt_q4 = amx_gemm_nt_q4;
}

const kt_kernels *kt_kernels_amx(void) {
  pthread_once(&table_once, make_table);
  return &amx_table;
}
#endif
