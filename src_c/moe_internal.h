/* moe_internal.h - the engine's state, shared by moe.c, moe_fwd.c, moe_bwd.c and route.c. */
#ifndef KTSFT_MOE_INTERNAL_H
#define KTSFT_MOE_INTERNAL_H

#include <pthread.h>

#include "internal.h"

/* Routes (t, j) with a valid expert, grouped by expert; within an expert ordered by t, then j. */
typedef struct kt_routing {
  int64_t num_tokens; /* T */
  int64_t num_routes; /* R <= T * k */
  int32_t n_active;   /* experts with at least one route */
  int32_t *active;    /* [n_active], ascending */
  int64_t *offset;    /* [E + 1]: routes of expert e are offset[e] .. offset[e+1]-1 */
  int32_t *token;     /* [R] t */
  int32_t *slot;      /* [R] t * k + j */
  float *weight;      /* [R] routing weight */
  int32_t k;
  int32_t *token_routes; /* [T, k]: the routes of each token in ascending order, then -1 */
} kt_routing;

size_t kt_routing_bytes(int64_t num_tokens, int32_t k, int32_t expert_num);
/* Checks every id (an error names the first bad one) and fills rt from mem. */
kt_status kt_routing_build(kt_routing *rt, void *mem, const int64_t *ids, const float *weights,
                           int64_t num_tokens, int32_t k, int32_t expert_num, kt_error *err);

/* What backward needs from one forward; owns two allocations. */
struct kt_saved {
  const kt_moe *owner;
  kt_routing rt;
  const uint16_t *x;      /* [T, H]: a private copy when saved, the caller's otherwise */
  uint16_t *g, *u;        /* [R, I] gate and up after the LoRA add, bf16 */
  float *a_g, *a_u, *a_d; /* [R, r] LoRA down-projections x A_g^T, x A_u^T, h A_d^T */
  float *h_scale;         /* int8 mode: [R] the scale h was quantized with for the down GEMM */
  void *routing_block, *state_block;
};

enum { KT_GATE = 0, KT_UP = 1, KT_DOWN = 2 };

struct kt_moe {
  kt_moe_config cfg;
  float scale; /* lora_alpha / r */
  kt_pool *pool;
  const kt_kernels *kern;
  kt_wtype wtype;          /* KT_WTYPE_INT8 in KT_QUANT_INT8 mode, KT_WTYPE_FP8 in KT_QUANT_FP8 */
  int64_t group;           /* KT_WTYPE_INT4: columns per scale; 0 otherwise */
  void *packed[3];         /* gate, up, down: E packed matrices each, allocated at first load */
  size_t packed_stride[3]; /* bytes between two experts' matrices */
  float *scales[3];        /* int8: [E, rows] per-row scales; fp8: [E, blocks] block scales;
                            * int4: [E, rows, groups] group scales */
  uint8_t *expert_loaded;  /* [E] */
  int32_t n_loaded;
  kt_saved **stack; /* [max_cache_depth] */
  int32_t depth;
  int profiling; /* phase timers on */
  double phase_seconds[KT_PHASE_COUNT];
  int64_t phase_runs[KT_PHASE_COUNT];
  pthread_mutex_t lock; /* one call at a time on an engine */
};

/* Scales of one [rows, cols] matrix: one per row (int8), one per 128 x 128 block (fp8), one per
 * row and group of `group` columns (int4). */
static inline int64_t kt_scale_count(kt_wtype t, int64_t rows, int64_t cols, int64_t group) {
  const int64_t b = KT_FP8_BLOCK;
  return t == KT_WTYPE_INT8   ? rows
         : t == KT_WTYPE_FP8  ? ((rows + b - 1) / b) * ((cols + b - 1) / b)
         : t == KT_WTYPE_INT4 ? rows * kt_int4_groups(cols, group)
                              : 0;
}
/* Floats the engine stores for them: int4's in blocks of 16 rows (kt_int4_scale_index). */
static inline int64_t kt_scale_stored(kt_wtype t, int64_t rows, int64_t cols, int64_t group) {
  return t == KT_WTYPE_INT4 ? kt_int4_scales_stored(rows, kt_int4_groups(cols, group))
                            : kt_scale_count(t, rows, cols, group);
}

/* Expert e's matrix of projection p (KT_GATE, KT_UP: [I, H]; KT_DOWN: [H, I]). */
static inline kt_packed kt_moe_weight(const kt_moe *m, int p, int32_t e) {
  const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
  kt_packed w = {
      (const char *)m->packed[p] + (size_t)e * m->packed_stride[p], I, H, m->wtype, NULL, m->group};
  if (p == KT_DOWN) {
    w.rows = H;
    w.cols = I;
  }
  if (m->scales[p])
    w.scale =
        m->scales[p] + (size_t)e * (size_t)kt_scale_stored(m->wtype, w.rows, w.cols, m->group);
  return w;
}

/* int4: the group scales of rows r0 .. r0 + n (r0 a multiple of 16) of expert e's matrix p, one
 * run of memory, fetched ahead of the x W^T that reads them with its nibbles (those lines would
 * otherwise arrive on demand, one per 16 rows and group). */
static inline void kt_moe_prefetch_scales(const kt_moe *m, int p, int32_t e, int64_t r0,
                                          int64_t n) {
  if (m->wtype != KT_WTYPE_INT4) return;
  const kt_packed w = kt_moe_weight(m, p, e);
  const int64_t ng = kt_int4_groups(w.cols, w.group), rows = w.rows - r0 < n ? w.rows - r0 : n;
  kt_prefetch_range(w.scale + kt_int4_scale_index(r0, 0, ng),
                    (size_t)kt_int4_scales_stored(rows, ng) * sizeof(float));
}

kt_status kt_lora_check(const kt_lora *l, kt_error *err);

/* Seconds of a monotonic clock. */
double kt_now(void);
/* kt_pool_parallel on the engine's pool, timed as `phase` when profiling is on. */
void kt_moe_run_phase(kt_moe *m, kt_phase phase, int64_t n_items, kt_work_fn fn, void *ctx);
/* Adds the time since `start` (kt_now()) to `phase` when profiling is on. */
void kt_moe_add_phase(kt_moe *m, kt_phase phase, double start);

/* Whether the per-H-block phases (F3, B4) give way to per-route buffers (F3 + F4, B4 + B5):
 * with fewer than 2 blocks of KT_BLOCK_N hidden columns per thread, too few items to go round. */
static inline int kt_split_by_route(int64_t n_hblk, int32_t nthreads) {
  return n_hblk < 2 * (int64_t)nthreads;
}

/* acc[0 .. H) = the sum of the rows y_route[route] of token t's routes, in ascending order (the
 * order in which the per-H-block phases add them): 0 for a token without routes. */
void kt_sum_token_routes(const kt_routing *rt, int64_t t, const float *y_route, int64_t H,
                         float *acc);

/* Rows of bf16 to fp32: out[m, j] = A[m, c0 + j] */
void kt_rows_to_f32(const kt_rows *a, int64_t c0, int64_t n, float *out, int64_t ldo);

#endif /* KTSFT_MOE_INTERNAL_H */
