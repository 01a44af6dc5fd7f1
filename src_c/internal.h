/*
 * internal.h - what the portable framework files share: bf16 conversion, errors, aligned
 * allocation, the parallel loop of the pool and the kernel table. Not installed.
 */
#ifndef KTSFT_INTERNAL_H
#define KTSFT_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "ktsft.h"

#define KT_CACHE_LINE 64
/* Columns of one work item: experts are split into blocks of this many output features. */
#define KT_BLOCK_N 64

/* Columns in the block of KT_BLOCK_N that starts at `start` of `total`. */
static inline int64_t kt_block_len(int64_t total, int64_t start) {
  return total - start < KT_BLOCK_N ? total - start : KT_BLOCK_N;
}

static inline size_t kt_max_size(size_t a, size_t b) { return a > b ? a : b; }

/* ---- bf16 --------------------------------------------------------------------------------- */

static inline float kt_bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Round to nearest even; NaN stays NaN (quiet), infinities stay infinite. */
static inline uint16_t kt_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float kt_round_bf16(float f) { return kt_bf16_to_f32(kt_f32_to_bf16(f)); }

/* ---- errors and memory -------------------------------------------------------------------- */

kt_status kt_fail(kt_error *err, kt_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* 64-byte aligned; NULL on failure or when bytes is 0. */
void *kt_alloc(size_t bytes);
void kt_free(void *p);

/* Carves one allocation into aligned pieces: first pass sums sizes, second hands out pointers. */
typedef struct kt_arena {
  char *base;
  size_t used;
} kt_arena;

static inline size_t kt_align_up(size_t n) {
  return (n + (KT_CACHE_LINE - 1)) & ~(size_t)(KT_CACHE_LINE - 1);
}

/* Reserves bytes; returns the piece (NULL while base is NULL, i.e. in the sizing pass). */
static inline void *kt_arena_take(kt_arena *a, size_t bytes) {
  void *p = a->base ? a->base + a->used : NULL;
  a->used += kt_align_up(bytes);
  return p;
}

/* ---- the pool's parallel loop ------------------------------------------------------------- */

/* Runs fn(ctx, item, worker) for item in [0, n_items), spread over every thread of the pool;
 * worker is in [0, kt_pool_num_threads). Returns when all items are done. Calls from several
 * threads are serialized. */
typedef void (*kt_work_fn)(void *ctx, int64_t item, int32_t worker);
void kt_pool_parallel(kt_pool *pool, int64_t n_items, kt_work_fn fn, void *ctx);

/* ---- kernel table -------------------------------------------------------------------------- */

/* Rows of a bf16 matrix: row m is base + (index ? index[m] : m) * ld. */
typedef struct kt_rows {
  const uint16_t *base;
  int64_t ld;
  const int32_t *index;
  int64_t count;
} kt_rows;

static inline const uint16_t *kt_row(const kt_rows *a, int64_t m) {
  return a->base + (a->index ? (int64_t)a->index[m] : m) * a->ld;
}

/* A frozen [rows, cols] bf16 matrix in a family's packed layout. */
typedef struct kt_packed {
  const void *data;
  int64_t rows, cols;
} kt_packed;

typedef struct kt_kernels {
  kt_isa isa;
  /* Bytes of one packed [rows, cols] matrix, and the packing itself. */
  size_t (*packed_bytes)(int64_t rows, int64_t cols);
  void (*pack)(void *dst, const uint16_t *src, int64_t rows, int64_t cols);
  /* Scratch the two GEMMs need for outputs of at most n columns and reductions of length k. */
  size_t (*gemm_scratch_bytes)(int64_t n, int64_t k);
  /* "x W^T": C[m, j] = sum_c A[m, c] * W[n0 + j, c], m < A.count, j < n, c < W.cols. */
  void (*gemm_nt)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                  int64_t ldc, void *scratch);
  /* "x W": C[m, j] = sum_c A[m, c] * W[c, n0 + j], m < A.count, j < n, c < W.rows. */
  void (*gemm_nn)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                  int64_t ldc, void *scratch);
  void (*sigmoid)(const float *x, float *y, int64_t n);
  void (*silu)(const float *x, float *y, int64_t n);
} kt_kernels;

/* The table of an available family (NULL otherwise). */
const kt_kernels *kt_kernels_for(kt_isa isa);

/* The portable family: its packed layout is plain row-major bf16, so LoRA tensors in the
 * caller's memory are valid operands of its GEMMs. */
extern const kt_kernels kt_kernels_generic;
void kt_act_generic_sigmoid(const float *x, float *y, int64_t n);
void kt_act_generic_silu(const float *x, float *y, int64_t n);

/* ---- CPU ----------------------------------------------------------------------------------- */

uint32_t kt_cpu_detect(void);

#endif /* KTSFT_INTERNAL_H */
