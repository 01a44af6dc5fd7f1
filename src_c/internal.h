/*
 * internal.h - what the portable framework files share: bf16 conversion, errors, aligned
 * allocation, the parallel loop of the pool and the kernel table. Not installed.
 */
#ifndef KTSFT_INTERNAL_H
#define KTSFT_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ktsft.h"

#define KT_CACHE_LINE 64
/* Before a loop over the rows or vectors of a register tile: unrolled whole, so that every
 * accumulator has a constant index and stays in a register. Where GCC leaves such a loop rolled,
 * the accumulator array lives on the stack and each step of the tile's inner loop stores it
 * back (measured: half the speed of x W on avx2). */
#define KT_UNROLL _Pragma("GCC unroll 16")
/* Columns of one work item: experts are split into blocks of this many output features. */
#define KT_BLOCK_N 64

/* Columns in the block of KT_BLOCK_N that starts at `start` of `total`. */
static inline int64_t kt_block_len(int64_t total, int64_t start) {
  return total - start < KT_BLOCK_N ? total - start : KT_BLOCK_N;
}

static inline size_t kt_max_size(size_t a, size_t b) { return a > b ? a : b; }

/* x W (gemm_nn, gemm_nn_q4) of at most KT_FEW_ROWS rows of A, a few tokens per expert, is bound
 * by the stream of W: every family takes up to KT_WIDE_N columns in one such call (more rows:
 * at most KT_BLOCK_N), so that the engine hands it wide column spans and W is read in long runs
 * instead of one band of KT_BLOCK_N columns per call. */
#define KT_FEW_ROWS 4
#define KT_WIDE_N 1024

/* ---- bf16 --------------------------------------------------------------------------------- */

static inline float kt_bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Round to nearest even; NaN stays NaN (quiet), infinities stay infinite. Branch-free, so that
 * loops of it vectorize. */
static inline uint16_t kt_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

static inline float kt_round_bf16(float f) { return kt_bf16_to_f32(kt_f32_to_bf16(f)); }

/* ---- errors and memory -------------------------------------------------------------------- */

kt_status kt_fail(kt_error *err, kt_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* 64-byte aligned; NULL on failure or when bytes is 0. */
void *kt_alloc(size_t bytes);
void kt_free(void *p);
/* Like kt_alloc, for large long-lived blocks (the packed weights): 2 MB aligned and, on Linux,
 * backed by transparent huge pages where the system allows. Freed by kt_free. */
void *kt_alloc_huge(size_t bytes);
/* Maps the not yet touched pages of a range of fresh anonymous memory in one system call (Linux),
 * where writing to them one by one would fault page by page. Only a hint. */
void kt_prefault(void *p, size_t bytes);

/* Asks for [p, p + bytes) in L2 ahead of its use (only a hint). */
static inline void kt_prefetch_range(const void *p, size_t bytes) {
  for (size_t at = 0; at < bytes; at += KT_CACHE_LINE)
    __builtin_prefetch((const char *)p + at, 0, 2);
}

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
/* hold 1 before a run of parallel loops (the phases of a call), 0 after it: in between, idle
 * workers spin for the next loop (up to kt_pool_set_spin) instead of sleeping. */
void kt_pool_hold(kt_pool *pool, int hold);

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

/* Rows of per-row quantized int8 activations: row m is base + i * ld and its scale is
 * scale[i], with i = index ? index[m] : m (value = int8 * scale). */
typedef struct kt_rows_q8 {
  const int8_t *base;
  int64_t ld;
  const int32_t *index;
  int64_t count;
  const float *scale;
} kt_rows_q8;

typedef enum kt_wtype {
  KT_WTYPE_BF16 = 0,
  KT_WTYPE_INT8 = 1,
  KT_WTYPE_FP8 = 2,
  KT_WTYPE_INT4 = 3
} kt_wtype;

/* Bytes of one packed element: 2 for bf16, 1 for int8 and fp8 (e4m3); int4 has two per byte
 * (see kt_wtype_matrix_bytes). */
static inline int64_t kt_wtype_size(kt_wtype t) { return t == KT_WTYPE_BF16 ? 2 : 1; }

/* Bytes of a row-major [rows, cols] matrix of this type as the API holds it; int4 rows are
 * ceil(cols / 2) bytes, two signed nibbles per byte, the low nibble the even column. */
static inline size_t kt_wtype_matrix_bytes(kt_wtype t, int64_t rows, int64_t cols) {
  const int64_t row = t == KT_WTYPE_INT4 ? (cols + 1) / 2 : cols * kt_wtype_size(t);
  return (size_t)rows * (size_t)row;
}

/* Group sizes of int4 weights (spec section 5.2). */
static inline int kt_int4_group_valid(int64_t g) { return g == 32 || g == 64 || g == 128; }
static inline int64_t kt_int4_groups(int64_t cols, int64_t group) {
  return (cols + group - 1) / group;
}
/* The engine holds int4 group scales in blocks of 16 rows of W: the scales of group g of rows
 * 16b .. 16b + 15 are 16 consecutive floats (0 past the last row), so a kernel reads a 16-row
 * block's scales as vectors, in the order it streams the block's nibbles, and the scales of
 * consecutive blocks are one run of memory. kt_int4_scale_index gives scale[n, g]'s place. */
static inline int64_t kt_int4_scale_index(int64_t n, int64_t g, int64_t ng) {
  return ((n >> 4) * ng + g) * 16 + (n & 15);
}
static inline int64_t kt_int4_scales_stored(int64_t rows, int64_t ng) {
  return (rows + 15) / 16 * 16 * ng;
}
/* The signed value of the nibble of column c in a row of the API int4 layout. */
static inline int32_t kt_int4_at(const uint8_t *row, int64_t c) {
  const int32_t v = (row[c / 2] >> (4 * (c & 1))) & 15;
  return v - ((v & 8) << 1);
}

/* Rows and columns of one fp8 scale block (spec section 5.1). */
#define KT_FP8_BLOCK 128
/* x W^T on fp8 of at most this many rows of A decodes in registers (gemm_nt_fp8_few). */
#define KT_FP8_FEW_M 4

/* A frozen [rows, cols] matrix in a family's packed layout:
 *   BF16  as given; scale NULL, or (x W only) one fp32 factor per row of W folded into A
 *   INT8  one fp32 scale per row: W[n, c] = q[n, c] * scale[n]
 *   FP8   e4m3 bytes packed as INT8 is. Stored with block scales [ceil(rows/128),
 *         ceil(cols/128)]: W[n, c] = e4m3(q[n, c]) * scale[(n / 128) * ceil(cols/128) + c / 128].
 *         The fp8 drivers (fp8.c) hand the kernels, for x W, the per-row factors of the column
 *         block instead (scale[n]: folded into A as for int8), and for x W^T either the block
 *         scales (gemm_nt_fp8_few) or bf16 panels of it (decode_fp8).
 *   INT4  signed 4-bit q in [-8, 7] with one fp32 scale per row and group of `group` columns:
 *         W[n, c] = q[n, c] * scale[kt_int4_scale_index(n, c / group, ceil(cols/group))]
 *         (spec section 5.2: the scales in blocks of 16 rows). pack takes, and unpack gives,
 *         the API layout of kt_wtype_matrix_bytes; only the gemm_*_q4 kernels read it.
 *         `group` is 0 for the other types. */
typedef struct kt_packed {
  const void *data;
  int64_t rows, cols;
  kt_wtype wtype;
  const float *scale;
  int64_t group;
} kt_packed;

/* A row-major bf16 matrix in the caller's memory (LoRA tensors), as a GEMM operand of the generic
 * family. */
static inline kt_packed kt_bf16_matrix(const uint16_t *data, int64_t rows, int64_t cols) {
  const kt_packed w = {data, rows, cols, KT_WTYPE_BF16, NULL, 0};
  return w;
}

/* A GEMM with bf16 activations, as in the kernel table below. */
typedef void (*kt_gemm_fn)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                           int64_t ldc, void *scratch);

/* A wide x W call (up to KT_WIDE_N columns) on a kernel that takes bands of KT_BLOCK_N. */
static inline void kt_gemm_in_bands(kt_gemm_fn band, const kt_rows *a, const kt_packed *w,
                                    int64_t n0, int64_t n, float *c, int64_t ldc, void *scratch) {
  for (int64_t j = 0; j < n; j += KT_BLOCK_N)
    band(a, w, n0 + j, kt_block_len(n, j), c + j, ldc, scratch);
}

/* The direction in which a GEMM walks the panels of an fp8 matrix (see decode_fp8). */
typedef enum kt_sweep { KT_SWEEP_COLS = 0, KT_SWEEP_ROWS = 1 } kt_sweep;

typedef struct kt_kernels {
  kt_isa isa;
  const char *variant; /* which instructions within the family, e.g. "avx512-bf16+vnni" */
  /* Bytes of one packed [rows, cols] matrix; packing from, and unpacking to, a row-major one
   * (bf16 for KT_WTYPE_BF16, int8 for KT_WTYPE_INT8; scales are kept by the caller). */
  size_t (*packed_bytes)(int64_t rows, int64_t cols, kt_wtype wtype);
  void (*pack)(void *dst, const void *src, int64_t rows, int64_t cols, kt_wtype wtype);
  void (*unpack)(void *dst, const void *packed, int64_t rows, int64_t cols, kt_wtype wtype);
  /* Scratch any of the GEMMs needs for outputs of at most n columns and reductions of length
   * k. */
  size_t (*gemm_scratch_bytes)(int64_t n, int64_t k);
  /* n0 is a multiple of KT_BLOCK_N in every GEMM below (faster families pack W in blocks), and
   * n at most KT_BLOCK_N, except in x W of at most KT_FEW_ROWS rows (KT_WIDE_N).
   * "x W^T", W bf16: C[m, j] = sum_c A[m, c] * W[n0 + j, c], m < A.count, j < n, c < W.cols. */
  void (*gemm_nt)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                  int64_t ldc, void *scratch);
  /* "x W^T", W fp8 with its block scales, for at most KT_FP8_FEW_M rows of A (bf16): the
   * e4m3 bytes decoded in registers, each 128-column block's fp32 partial sum times its scale.
   * NULL in families that run every x W^T on decoded panels. */
  void (*gemm_nt_fp8_few)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                          int64_t ldc, void *scratch);
  /* W[r0 .. r0 + nr, c0 .. c0 + nc) of a packed FP8 matrix as a packed BF16 [nr, nc] matrix
   * (what pack would make of the decoded values; e4m3 is exact in bf16). r0 and c0 are
   * multiples of KT_BLOCK_N. `sweep` says where the caller's next panel lies, for prefetching:
   * KT_SWEEP_COLS at columns c0 + nc (x W^T), KT_SWEEP_ROWS at rows r0 + nr (x W). */
  void (*decode_fp8)(const kt_packed *w, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                     kt_sweep sweep, void *dst);
  /* "x W^T", both int8: C[m, j] = sa[m] sw[n0 + j] sum_c qa[m, c] qw[n0 + j, c], the sum in
   * int32. */
  void (*gemm_nt_q8)(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                     int64_t ldc, void *scratch);
  /* "x W", W bf16, int8 or fp8: C[m, j] = sum_c A[m, c] * W[c, n0 + j], m < A.count, j < n,
   * c < W.rows. With a row scale (int8, fp8), it folds into A in fp32:
   * sum_c (A[m, c] sw[c]) W[c, n0 + j]. */
  void (*gemm_nn)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                  int64_t ldc, void *scratch);
  /* "x W^T", A int8 with per-row scales, W int4 (W4A8): C[m, j] = sa[m] sum_g sw[n0 + j, g]
   * sum_{c in g} qa[m, c] qw[n0 + j, c], each group's sum in int32, the groups in fp32. */
  void (*gemm_nt_q4)(const kt_rows_q8 *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                     int64_t ldc, void *scratch);
  /* "x W", A bf16, W int4: C[m, j] = sum_c (A[m, c] sw[c, g]) qw[c, n0 + j] with g the group of
   * column n0 + j: the group scale folds into A in fp32, the nibbles are read as they are. */
  void (*gemm_nn_q4)(const kt_rows *a, const kt_packed *w, int64_t n0, int64_t n, float *c,
                     int64_t ldc, void *scratch);
  void (*sigmoid)(const float *x, float *y, int64_t n);
  void (*silu)(const float *x, float *y, int64_t n);
  /* dst[i] = bf16(v[i]) (or bf16(bf16 dst[i] + v[i]) when accumulating), rounded to nearest even
   * as kt_f32_to_bf16 does, NaN kept quiet: the gradients' and outputs' stores, bit for bit the
   * same in every family. */
  void (*store_bf16)(uint16_t *dst, const float *v, int64_t n, int accumulate);
  /* The LoRA products: B is a row-major bf16 tensor in the caller's memory, one of the two
   * sizes is the rank r. lora_nt: C[m, q] = sum_c A[m, c] B[q, c] (B: [n, k]); lora_nn:
   * C[m, q] = sum_c A[m, c] B[c, q] (B: [k, n]); scratch: gemm_scratch_bytes(n, k). */
  void (*lora_nt)(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k, float *c, int64_t ldc,
                  void *scratch);
  void (*lora_nn)(const kt_rows *a, const uint16_t *b, int64_t k, int64_t n, float *c, int64_t ldc,
                  void *scratch);
  /* C[m, j] += s * sum_q a[m, q] * B[n0 + j, q]   (a: [M, r] fp32, B: [*, r] bf16) */
  void (*lora_add_nt)(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b,
                      int64_t n0, float s, float *c, int64_t ldc);
  /* C[m, j] += s * sum_q a[m, q] * B[q, n0 + j]   (a: [M, r] fp32, B: [r, ldb] bf16) */
  void (*lora_add_nn)(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b,
                      int64_t ldb, int64_t n0, float s, float *c, int64_t ldc);
  /* out[q, j] = s * sum_m coef[m, q] * rowscale[m] * X[m, j]  -> [r, n]; rowscale may be NULL */
  void (*outer_rn)(int64_t M, int64_t r, int64_t n, const float *coef, const float *rowscale,
                   const float *x, int64_t ldx, float s, float *out);
  /* out[j, q] = s * sum_m D[m, j] * coef[m, q]  -> [n, r] */
  void (*outer_nr)(int64_t M, int64_t n, int64_t r, const float *d, int64_t ldd, const float *coef,
                   float s, float *out);
} kt_kernels;

/* The table of an available family (NULL otherwise). */
const kt_kernels *kt_kernels_for(kt_isa isa);

/* The portable family: its packed layout is plain row-major bf16, so LoRA tensors in the
 * caller's memory are valid operands of its GEMMs. */
extern const kt_kernels kt_kernels_generic;
/* The AMX tile kernels (gemm_amx.c): native where the compiler has the intrinsics (the avx512
 * table of this CPU with the tile GEMMs, built at first use), and on the software tile model
 * (amx_emu.c) everywhere. */
const kt_kernels *kt_kernels_amx(void);
extern const kt_kernels kt_kernels_amx_emu;
void kt_act_generic_sigmoid(const float *x, float *y, int64_t n);
void kt_act_generic_silu(const float *x, float *y, int64_t n);
/* The portable store_bf16 (lora.c). */
void kt_store_bf16(uint16_t *dst, const float *v, int64_t n, int accumulate);

/* The generic family's LoRA products (lora.c, gemm_generic.c) and its scratch size, also used by
 * families that keep no LoRA kernels of their own; the kernel table says what each computes. */
size_t kt_generic_gemm_scratch_bytes(int64_t n, int64_t k);
void kt_lora_generic_nt(const kt_rows *a, const uint16_t *b, int64_t n, int64_t k, float *c,
                        int64_t ldc, void *scratch);
void kt_lora_generic_nn(const kt_rows *a, const uint16_t *b, int64_t k, int64_t n, float *c,
                        int64_t ldc, void *scratch);

/* C[m, j] += s * sum_c a[m, c] * B[n0 + j, c]   (a: [M, r] fp32, B: [*, r] bf16) */
void kt_lora_add_nt(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b, int64_t n0,
                    float s, float *c, int64_t ldc);
/* C[m, j] += s * sum_c a[m, c] * B[c, n0 + j]   (a: [M, r] fp32, B: [r, ldb] bf16) */
void kt_lora_add_nn(int64_t M, int64_t n, int64_t r, const float *a, const uint16_t *b, int64_t ldb,
                    int64_t n0, float s, float *c, int64_t ldc);
/* out[c, j] = s * sum_m coef[m, c] * rowscale[m] * X[m, j]  -> [r, n]; rowscale may be NULL */
void kt_outer_rn(int64_t M, int64_t r, int64_t n, const float *coef, const float *rowscale,
                 const float *x, int64_t ldx, float s, float *out);
/* out[j, c] = s * sum_m D[m, j] * coef[m, c]  -> [n, r] */
void kt_outer_nr(int64_t M, int64_t n, int64_t r, const float *d, int64_t ldd, const float *coef,
                 float s, float *out);
/* The faster families hold several variants and pick one from the CPU features they are given
 * (kt_cpu_features(), narrowed for tests by kt_kernels_testing_set). */
const kt_kernels *kt_kernels_avx512(uint32_t features);
const kt_kernels *kt_kernels_avx2(uint32_t features);
/* Not a CPU feature: asks the avx512 family for its vdpbf16ps code run on the software model of
 * the instruction (kernels/gemm_avx512_bf16emu.c), so CPUs without AVX512_BF16 test it. */
#define KT_CPU_TEST_EMULATE_BF16 (1u << 31)

/* ---- int8 quantization (spec section 5) ------------------------------------------------ */

/* One row, symmetric: scale = max|v| / 127, q = round_half_even(v / scale) clamped to +-127.
 * A zero row gets scale 0 and q 0; a row holding NaN or Inf gets scale NaN (and q 0), so that the
 * non-finite value propagates to every product with the row. Returns the scale. */
float kt_quantize_row_bf16(const uint16_t *src, int64_t n, int8_t *q);

/* The int8 value of v on a row quantized with `scale` (> 0), as a float. */
static inline float kt_quantize_value(float v, float scale) {
  const float q = rintf(v / scale); /* the default rounding mode: half to even */
  return q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
}

/* What the int8 GEMM sees of v on such a row: its int8 value times the scale (0 for a zero row,
 * NaN for a row with a non-finite value). */
static inline float kt_dequantize_value(float v, float scale) {
  return scale == 0.0f ? 0.0f : kt_quantize_value(v, scale) * scale;
}

/* ---- int4 (spec section 5.2) ---------------------------------------------------------------- */

/* Quantizes a bf16 [rows, cols] matrix to int4 with one scale per row and group of `group`
 * columns: scale = amax / 7, q = rne(w / scale) clamped to [-8, 7], in fp32; an all-zero group
 * gets scale 0, a group with a non-finite value scale NaN (its nibbles 0). q: the API layout
 * [rows, ceil(cols/2)] bytes; scale [rows, ceil(cols/group)]. */
void kt_quantize_int4_bf16(const uint16_t *w, int64_t rows, int64_t cols, int64_t group, uint8_t *q,
                           float *scale);
/* Group scales [rows, ng] (the API layout) to the engine's blocks of 16 rows
 * (kt_int4_scales_stored(rows, ng) floats), and back. */
void kt_int4_scales_to_blocks(const float *src, int64_t rows, int64_t ng, float *dst);
void kt_int4_scales_from_blocks(const float *src, int64_t rows, int64_t ng, float *dst);

/* ---- fp8 e4m3 (spec section 5.1) ----------------------------------------------------------- */

/* The bf16 bits of an e4m3 (float8_e4m3fn) byte: exact; 0x7f and 0xff are NaN. */
static inline uint16_t kt_e4m3_to_bf16(uint8_t b) {
  const uint16_t sign = (uint16_t)((b & 0x80u) << 8);
  const unsigned e = (b >> 3) & 15u, m = b & 7u;
  if (e == 15u && m == 7u) return (uint16_t)(sign | 0x7fc0u);
  if (e > 0u) return (uint16_t)(sign | ((e + 120u) << 7) | (m << 4));
  if (m == 0u) return sign;
  /* subnormal m 2^-9: normalize the leading bit p of m */
  const unsigned p = m >= 4u ? 2u : m >= 2u ? 1u : 0u;
  return (uint16_t)(sign | ((118u + p) << 7) | (((m << (7u - p)) & 0x7fu)));
}

/* The e4m3 byte nearest v (ties to even), saturated at +-448; NaN gives 0x7f (with its sign). */
uint8_t kt_f32_to_e4m3(float v);

/* Quantizes a bf16 [rows, cols] matrix to e4m3 with one scale per 128 x 128 block (amax / 448,
 * w / scale in fp32, then to e4m3; an all-zero block gets scale 0 and zero bytes; a block with
 * a non-finite value gets scale NaN). q [rows, cols], scale [ceil(rows/128), ceil(cols/128)]. */
void kt_quantize_fp8_bf16(const uint16_t *w, int64_t rows, int64_t cols, uint8_t *q, float *scale);

/* The fp8 GEMMs (fp8.c), same contracts as gemm_nt and gemm_nn of the table, with scratch of
 * kt_fp8_scratch_bytes(kern, n, k) bytes:
 *   x W^T  per 128-column block: the fp32 partial sum of the block times its scale; a few rows
 *          of A on the family's gemm_nt_fp8_few, more on its bf16 gemm_nt over decoded panels
 *   x W    the family's gemm_nn with the block scales of each row folded into A in fp32, per
 *          128-column block of the call */
size_t kt_fp8_scratch_bytes(const kt_kernels *kern, int64_t n, int64_t k);
void kt_fp8_gemm_nt(const kt_kernels *kern, const kt_rows *a, const kt_packed *w, int64_t n0,
                    int64_t n, float *c, int64_t ldc, void *scratch);
void kt_fp8_gemm_nn(const kt_kernels *kern, const kt_rows *a, const kt_packed *w, int64_t n0,
                    int64_t n, float *c, int64_t ldc, void *scratch);

/* The base-weight GEMMs with bf16 activations, whatever the storage (bf16, int8 for x W, fp8). */
static inline void kt_base_gemm_nt(const kt_kernels *kern, const kt_rows *a, const kt_packed *w,
                                   int64_t n0, int64_t n, float *c, int64_t ldc, void *scratch) {
  if (w->wtype == KT_WTYPE_FP8)
    kt_fp8_gemm_nt(kern, a, w, n0, n, c, ldc, scratch);
  else
    kern->gemm_nt(a, w, n0, n, c, ldc, scratch);
}
static inline void kt_base_gemm_nn(const kt_kernels *kern, const kt_rows *a, const kt_packed *w,
                                   int64_t n0, int64_t n, float *c, int64_t ldc, void *scratch) {
  if (w->wtype == KT_WTYPE_INT4)
    kern->gemm_nn_q4(a, w, n0, n, c, ldc, scratch);
  else if (w->wtype == KT_WTYPE_FP8)
    kt_fp8_gemm_nn(kern, a, w, n0, n, c, ldc, scratch);
  else
    kern->gemm_nn(a, w, n0, n, c, ldc, scratch);
}
/* The base-weight GEMM x W^T with int8 activations (int8 weights, or int4: W4A8). */
static inline void kt_base_gemm_nt_q8(const kt_kernels *kern, const kt_rows_q8 *a,
                                      const kt_packed *w, int64_t n0, int64_t n, float *c,
                                      int64_t ldc, void *scratch) {
  (w->wtype == KT_WTYPE_INT4 ? kern->gemm_nt_q4 : kern->gemm_nt_q8)(a, w, n0, n, c, ldc, scratch);
}
/* Scratch of any of them for outputs of at most n columns and reductions of length k. */
static inline size_t kt_base_gemm_scratch_bytes(const kt_kernels *kern, kt_wtype t, int64_t n,
                                                int64_t k) {
  if (t == KT_WTYPE_INT4) /* the portable int4 kernels take the generic family's scratch */
    return kt_max_size(kern->gemm_scratch_bytes(n, k), kt_generic_gemm_scratch_bytes(n, k));
  return t == KT_WTYPE_FP8 ? kt_fp8_scratch_bytes(kern, n, k) : kern->gemm_scratch_bytes(n, k);
}

/* ---- CPU ----------------------------------------------------------------------------------- */

uint32_t kt_cpu_detect(void);

#endif /* KTSFT_INTERNAL_H */
