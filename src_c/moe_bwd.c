/* moe_bwd.c - the backward pass (spec section 3) in five parallel phases, on the newest saved
 * forward. go is grad_output; w the routing weight of a route; dy = w go is never formed:
 *
 *   B0  per token block       go as bf16 (only when the caller passes float32)
 *   B1  per expert            q = go B_d                                            [R_e, r]
 *   B2  per expert, I span    z = go W_d; h again from the saved g, u; grad_w parts <z, h>
 *                             (int8: h as the down GEMM saw it);
 *                             dh = w (z + s q A_d); dg, du (bf16); dA_d, dB_g, dB_u blocks
 *   B3  per expert            b_g = dg B_g, b_u = du B_u; grad_w = sum of parts + s <q, a_d>
 *   B4  per H block           dx = sum over experts of dg W_g + du W_u + s (b_g A_g + b_u A_u);
 *                             dA_g, dA_u, dB_d blocks
 *       (fewer H blocks than 2 threads each, or a few routes per expert: per expert and span of
 *       H, each route's part to a buffer; B5, per token, sums them in the same order)
 *
 * With at most KT_FEW_ROWS routes per expert, x W (B2, B4) is bound by reading W: its items then
 * span up to KT_WIDE_N columns, so that each call streams W in long runs. Otherwise a B2 item
 * is up to 4 blocks of KT_BLOCK_N columns of I, and a B4 item up to 8 blocks of H, whose calls
 * take one block each, one after the other (an expert's next block is the run of W adjacent to
 * the last one's).
 *
 * Like the forward, each output element has one owner that sums in a fixed order. */
#include <inttypes.h>
#include <stdlib.h>

#include "moe_internal.h"

typedef struct bwd_ctx {
  const kt_moe *m;
  const kt_saved *st;
  const kt_backward_args *args;
  const uint16_t *go;     /* [T, H] bf16 */
  uint16_t *go_converted; /* [T, H] when grad_output is float32 */
  float *q, *b_g, *b_u;   /* [R, r] */
  float *gw_part;         /* [R, n_iblk] */
  float *y_route;         /* [R, H] when B4 splits by route (see b4_input_routes), else NULL */
  uint16_t *dg, *du;      /* [R, I] */
  int64_t max_routes, n_iblk, n_hblk, n_tblk;
  int64_t hspan;          /* H blocks per b4_input item */
  int64_t ispan, n_ispan; /* I columns per B2 item, and such spans per expert */
  int64_t hcols, n_hcols; /* H columns per b4_input_routes item, and such spans per expert */
  char *scratch;
  size_t scratch_each;
} bwd_ctx;

static int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

static float *worker_scratch(const bwd_ctx *c, int32_t worker) {
  return (float *)(c->scratch + (size_t)worker * c->scratch_each);
}

static void b0_convert_go(void *vc, int64_t item, int32_t worker) {
  (void)worker;
  const bwd_ctx *c = vc;
  const int64_t H = c->m->cfg.hidden_size, T = c->st->rt.num_tokens;
  const int64_t t0 = item * KT_BLOCK_N, nt = kt_block_len(T, t0);
  const float *src = (const float *)c->args->grad_output + t0 * H;
  uint16_t *dst = c->go_converted + t0 * H;
  for (int64_t i = 0; i < nt * H; i++) dst[i] = kt_f32_to_bf16(src[i]);
}

static void b1_q(void *vc, int64_t item, int32_t worker) {
  const bwd_ctx *c = vc;
  const kt_moe *m = c->m;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = m->cfg.hidden_size, r = m->cfg.lora_rank;
  const int32_t e = rt->active[item];
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  const kt_rows go = {c->go, H, rt->token + off, M};
  m->kern->lora_nn(&go, c->args->lora.down_b + e * H * r, H, r, c->q + off * r, r,
                   worker_scratch(c, worker));
}

/* Expert e in the I block i0 .. i0 + nb, given z = go W_d of the block (row stride ldz): h, the
 * grad_w parts, dh, dg, du and the blocks of dA_d, dB_g, dB_u. work: 5 M nb + nb r floats. */
static void b2_block(const bwd_ctx *c, int32_t e, int64_t i0, int64_t nb, float *z, int64_t ldz,
                     float *work) {
  const kt_moe *m = c->m;
  const kt_saved *st = c->st;
  const kt_routing *rt = &st->rt;
  const kt_backward_args *a = c->args;
  const int64_t I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const float s = m->scale;
  const int64_t ib = i0 / KT_BLOCK_N;
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off, tile = M * nb;
  float *g = work, *u = g + tile, *sg = u + tile, *silu_g = sg + tile, *h = silu_g + tile;
  float *small = h + tile;
  const kt_rows gr = {st->g + off * I, I, NULL, M}, ur = {st->u + off * I, I, NULL, M};
  kt_rows_to_f32(&gr, i0, nb, g, nb);
  kt_rows_to_f32(&ur, i0, nb, u, nb);
  m->kern->silu(g, silu_g, tile);
  m->kern->sigmoid(g, sg, tile);
  for (int64_t i = 0; i < tile; i++) h[i] = kt_round_bf16(silu_g[i] * u[i]);
  /* grad_w = <go, y>: its base part is <z, h> with h as the down GEMM of the forward saw it
   * (in int8 mode quantized with the saved scale of its route) */
  for (int64_t mm = 0; mm < M; mm++) {
    const float hs = st->h_scale ? st->h_scale[off + mm] : 0.0f;
    float part = 0.0f;
    for (int64_t j = 0; j < nb; j++) {
      const float hv = h[mm * nb + j];
      part += z[mm * ldz + j] * (st->h_scale ? kt_dequantize_value(hv, hs) : hv);
    }
    c->gw_part[(off + mm) * c->n_iblk + ib] = part;
  }
  /* dh = w (z + s q A_d[:, block]), kept in z */
  const float *q = c->q + off * r;
  m->kern->lora_add_nn(M, nb, r, q, a->lora.down_a + e * r * I, I, i0, s, z, ldz);
  for (int64_t mm = 0; mm < M; mm++) {
    const float w = rt->weight[off + mm];
    for (int64_t j = 0; j < nb; j++) {
      const int64_t t = mm * nb + j;
      const float dh = w * z[mm * ldz + j];
      const float dg = dh * u[t] * sg[t] * (1.0f + g[t] * (1.0f - sg[t]));
      const uint16_t dgb = kt_f32_to_bf16(dg), dub = kt_f32_to_bf16(dh * silu_g[t]);
      c->dg[(off + mm) * I + i0 + j] = dgb;
      c->du[(off + mm) * I + i0 + j] = dub;
      g[t] = kt_bf16_to_f32(dgb); /* g and u now hold dg and du */
      u[t] = kt_bf16_to_f32(dub);
    }
  }
  /* dA_d[e][:, block] = s sum_m w q^T h */
  m->kern->outer_rn(M, r, nb, q, rt->weight + off, h, nb, s, small);
  for (int64_t qq = 0; qq < r; qq++)
    m->kern->store_bf16(a->grads.down_a + (e * r + qq) * I + i0, small + qq * nb, nb,
                        a->accumulate);
  /* dB_g[e][block, :] = s dg^T a_g, dB_u likewise: rows of the block are contiguous */
  m->kern->outer_nr(M, nb, r, g, nb, st->a_g + off * r, s, small);
  m->kern->store_bf16(a->grads.gate_b + (e * I + i0) * r, small, nb * r, a->accumulate);
  m->kern->outer_nr(M, nb, r, u, nb, st->a_u + off * r, s, small);
  m->kern->store_bf16(a->grads.up_b + (e * I + i0) * r, small, nb * r, a->accumulate);
}

/* One expert and span of I: z = go W_d in one call, then each block of it. */
static void b2_down_act(void *vc, int64_t item, int32_t worker) {
  const bwd_ctx *c = vc;
  const kt_moe *m = c->m;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const int32_t e = rt->active[item / c->n_ispan];
  const int64_t i0 = (item % c->n_ispan) * c->ispan, width = min_i64(c->ispan, I - i0);
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  float *z = worker_scratch(c, worker), *work = z + M * width;
  void *gemm_scratch = work + 5 * M * KT_BLOCK_N + KT_BLOCK_N * r;
  const kt_rows go = {c->go, H, rt->token + off, M};
  const kt_packed wd = kt_moe_weight(m, KT_DOWN, e);
  /* more than a few rows: x W takes one block of KT_BLOCK_N columns per call, the span's adjacent
   * blocks one after the other (the next block's runs of W are partly fetched already) */
  const int64_t band = M <= KT_FEW_ROWS ? width : KT_BLOCK_N;
  for (int64_t j = 0; j < width; j += band)
    kt_base_gemm_nn(m->kern, &go, &wd, i0 + j, min_i64(band, width - j), z + j, width,
                    gemm_scratch);
  for (int64_t b0 = i0; b0 < i0 + width; b0 += KT_BLOCK_N)
    b2_block(c, e, b0, kt_block_len(I, b0), z + (b0 - i0), width, work);
}

static void b3_lora_b_and_weights(void *vc, int64_t item, int32_t worker) {
  const bwd_ctx *c = vc;
  const kt_moe *m = c->m;
  const kt_saved *st = c->st;
  const kt_routing *rt = &st->rt;
  const kt_backward_args *a = c->args;
  const int64_t I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const int32_t e = rt->active[item];
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  const kt_rows dg = {c->dg + off * I, I, NULL, M}, du = {c->du + off * I, I, NULL, M};
  float *scratch = worker_scratch(c, worker);
  m->kern->lora_nn(&dg, a->lora.gate_b + e * I * r, I, r, c->b_g + off * r, r, scratch);
  m->kern->lora_nn(&du, a->lora.up_b + e * I * r, I, r, c->b_u + off * r, r, scratch);
  if (!a->grad_weights) return;
  for (int64_t mm = off; mm < off + M; mm++) {
    float gw = 0.0f, lora = 0.0f;
    for (int64_t ib = 0; ib < c->n_iblk; ib++) gw += c->gw_part[mm * c->n_iblk + ib];
    for (int64_t qq = 0; qq < r; qq++) lora += c->q[mm * r + qq] * st->a_d[mm * r + qq];
    gw += m->scale * lora;
    float *dst = a->grad_weights + rt->slot[mm];
    *dst = a->accumulate ? *dst + gw : gw;
  }
}

/* Expert e in the H columns h0 .. h0 + nb: y [M, nb] (row stride ldy) = dg W_g + s b_g A_g +
 * (du W_u + s b_u A_u), each route's part of dx; and the blocks of dA_g, dA_u and dB_d. work:
 * (2 max_routes + r) nb floats, then the GEMMs' scratch. */
static void b4_expert_block(const bwd_ctx *c, int32_t e, int64_t h0, int64_t nb, float *y,
                            int64_t ldy, float *work) {
  const kt_moe *m = c->m;
  const kt_saved *st = c->st;
  const kt_routing *rt = &st->rt;
  const kt_backward_args *a = c->args;
  const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size, r = m->cfg.lora_rank;
  const int64_t Mx = c->max_routes;
  const float s = m->scale;
  const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
  float *yu = work, *xt = yu + Mx * nb, *small = xt + Mx * nb;
  void *gemm_scratch = small + nb * r;
  const kt_rows dg = {c->dg + off * I, I, NULL, M}, du = {c->du + off * I, I, NULL, M};
  const kt_packed wg = kt_moe_weight(m, KT_GATE, e), wu = kt_moe_weight(m, KT_UP, e);
  const float *bg = c->b_g + off * r, *bu = c->b_u + off * r;
  const uint16_t *ag = a->lora.gate_a + e * r * H, *au = a->lora.up_a + e * r * H;
  kt_base_gemm_nn(m->kern, &dg, &wg, h0, nb, y, ldy, gemm_scratch);
  m->kern->lora_add_nn(M, nb, r, bg, ag, H, h0, s, y, ldy);
  kt_base_gemm_nn(m->kern, &du, &wu, h0, nb, yu, nb, gemm_scratch);
  m->kern->lora_add_nn(M, nb, r, bu, au, H, h0, s, yu, nb);
  for (int64_t mm = 0; mm < M; mm++)
    for (int64_t j = 0; j < nb; j++) y[mm * ldy + j] += yu[mm * nb + j];
  /* dA_g[e][:, block] = s b_g^T x, dA_u likewise */
  const kt_rows x = {st->x, H, rt->token + off, M};
  kt_rows_to_f32(&x, h0, nb, xt, nb);
  m->kern->outer_rn(M, r, nb, bg, NULL, xt, nb, s, small);
  for (int64_t qq = 0; qq < r; qq++)
    m->kern->store_bf16(a->grads.gate_a + (e * r + qq) * H + h0, small + qq * nb, nb,
                        a->accumulate);
  m->kern->outer_rn(M, r, nb, bu, NULL, xt, nb, s, small);
  for (int64_t qq = 0; qq < r; qq++)
    m->kern->store_bf16(a->grads.up_a + (e * r + qq) * H + h0, small + qq * nb, nb, a->accumulate);
  /* dB_d[e][block, :] = s (w go)^T a_d */
  const kt_rows go = {c->go, H, rt->token + off, M};
  kt_rows_to_f32(&go, h0, nb, xt, nb);
  for (int64_t mm = 0; mm < M; mm++)
    for (int64_t j = 0; j < nb; j++) xt[mm * nb + j] *= rt->weight[off + mm];
  m->kern->outer_nr(M, nb, r, xt, nb, st->a_d + off * r, s, small);
  m->kern->store_bf16(a->grads.down_b + (e * H + h0) * r, small, nb * r, a->accumulate);
}

/* One item per hspan consecutive H blocks (enough items for the threads): sums every expert's
 * part of each block in place, block by block in the same order whatever hspan is. An item of
 * several blocks calls each expert for its blocks one after the other, so that the next block's
 * runs of W, adjacent to the last, are partly fetched already, and the lines of the int4 group
 * scales (16 groups, 512 columns, a line) that x W reads for every row of W are still in cache. */
static void b4_input(void *vc, int64_t item, int32_t worker) {
  const bwd_ctx *c = vc;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = c->m->cfg.hidden_size, T = rt->num_tokens;
  const int64_t first = item * c->hspan, last = min_i64(first + c->hspan, c->n_hblk);
  const int64_t w0 = first * KT_BLOCK_N, width = min_i64(last * KT_BLOCK_N, H) - w0;
  float *acc = worker_scratch(c, worker), *yt = acc + T * width,
        *work = yt + c->max_routes * KT_BLOCK_N;
  for (int64_t i = 0; i < T * width; i++) acc[i] = 0.0f;
  for (int32_t ai = 0; ai < rt->n_active; ai++) {
    const int32_t e = rt->active[ai];
    const int64_t off = rt->offset[e], M = rt->offset[e + 1] - off;
    for (int64_t b = first; b < last; b++) {
      const int64_t h0 = b * KT_BLOCK_N, nb = kt_block_len(H, h0);
      b4_expert_block(c, e, h0, nb, yt, nb, work);
      for (int64_t mm = 0; mm < M; mm++) {
        float *dst = acc + (int64_t)rt->token[off + mm] * width + (h0 - w0);
        for (int64_t j = 0; j < nb; j++) dst[j] += yt[mm * nb + j];
      }
    }
  }
  for (int64_t t = 0; t < T; t++)
    c->m->kern->store_bf16(c->args->grad_input + t * H + w0, acc + t * width, width,
                           c->args->accumulate);
}

/* Too few H blocks for the threads, or a few routes per expert: one item per expert and span of
 * hcols columns writes each route's part to y_route [R, H]; b5_sum_routes then adds a token's
 * parts in the order b4_input does. */
static void b4_input_routes(void *vc, int64_t item, int32_t worker) {
  const bwd_ctx *c = vc;
  const kt_routing *rt = &c->st->rt;
  const int64_t H = c->m->cfg.hidden_size;
  const int32_t e = rt->active[item / c->n_hcols];
  const int64_t h0 = (item % c->n_hcols) * c->hcols, nb = min_i64(c->hcols, H - h0);
  b4_expert_block(c, e, h0, nb, c->y_route + rt->offset[e] * H + h0, H, worker_scratch(c, worker));
}

static void b5_sum_routes(void *vc, int64_t t, int32_t worker) {
  const bwd_ctx *c = vc;
  const int64_t H = c->m->cfg.hidden_size;
  float *acc = worker_scratch(c, worker);
  kt_sum_token_routes(&c->st->rt, t, c->y_route, H, acc);
  c->m->kern->store_bf16(c->args->grad_input + t * H, acc, H, c->args->accumulate);
}

/* Expert e's six LoRA gradient slices: address and bytes of each. */
static void expert_grad_slices(const bwd_ctx *c, int64_t e, uint16_t *slice[6], size_t bytes[6]) {
  const kt_lora_grads *g = &c->args->grads;
  const size_t H = (size_t)c->m->cfg.hidden_size, I = (size_t)c->m->cfg.intermediate_size;
  const size_t r = (size_t)c->m->cfg.lora_rank;
  uint16_t *const base[6] = {g->gate_a, g->up_a, g->gate_b, g->up_b, g->down_a, g->down_b};
  const size_t elems[6] = {r * H, r * H, I * r, I * r, r * I, H * r};
  for (int i = 0; i < 6; i++) {
    slice[i] = base[i] + (size_t)e * elems[i];
    bytes[i] = elems[i] * sizeof(uint16_t);
  }
}

/* Gradient buffers on fresh zero pages: map the pages of the experts with routes in bulk. */
static void prefault_routed(void *vc, int64_t item, int32_t worker) {
  (void)worker;
  const bwd_ctx *c = vc;
  uint16_t *slice[6];
  size_t bytes[6];
  expert_grad_slices(c, c->st->rt.active[item], slice, bytes);
  for (int i = 0; i < 6; i++) kt_prefault(slice[i], bytes[i]);
}

/* Overwrite mode: an expert without routes gets zero gradients (one item per expert). */
static void zero_unrouted(void *vc, int64_t e, int32_t worker) {
  (void)worker;
  const bwd_ctx *c = vc;
  const kt_routing *rt = &c->st->rt;
  if (rt->offset[e + 1] > rt->offset[e]) return;
  uint16_t *slice[6];
  size_t bytes[6];
  expert_grad_slices(c, e, slice, bytes);
  for (int i = 0; i < 6; i++) memset(slice[i], 0, bytes[i]);
}

/* Columns per item of a phase that splits each of n_active experts' `cols` columns: from
 * KT_BLOCK_N up to `most`, as many as leave 4 items per thread. */
static int64_t span_cols(int64_t most, int64_t cols, int64_t n_active, int32_t nthreads) {
  int64_t w = KT_BLOCK_N;
  while (2 * w <= most && w < cols &&
         n_active * ((cols + 2 * w - 1) / (2 * w)) >= 4 * (int64_t)nthreads)
    w *= 2;
  return w;
}

kt_status kt_moe_backward(kt_moe *m, const kt_backward_args *args, kt_error *err) {
  const kt_moe_config *cfg = &m->cfg;
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size, r = cfg->lora_rank;
  const kt_lora_grads *gr = &args->grads;
  if (!args->grad_output || !args->grad_input || !gr->gate_a || !gr->gate_b || !gr->up_a ||
      !gr->up_b || !gr->down_a || !gr->down_b)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "grad_output, grad_input and the six LoRA gradient buffers must all be set "
                   "(got a null pointer)");
  if (args->grad_output_dtype != KT_DTYPE_F32 && args->grad_output_dtype != KT_DTYPE_BF16)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT, "grad_output dtype must be bfloat16 or float32");
  kt_status s = kt_lora_check(&args->lora, err);
  if (s != KT_OK) return s;

  if (args->saved && args->saved->owner != m)
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "saved: the saved state comes from the forward of another engine");
  pthread_mutex_lock(&m->lock);
  const double call_start = m->profiling ? kt_now() : 0.0;
  if (!kt_moe_weights_loaded(m) || (!args->saved && m->depth == 0)) {
    pthread_mutex_unlock(&m->lock);
    if (!kt_moe_weights_loaded(m))
      return kt_fail(err, KT_ERR_WEIGHTS_NOT_LOADED,
                     "Weights not loaded: %d of %d experts loaded; load the base weights before "
                     "backward",
                     (int)m->n_loaded, (int)cfg->expert_num);
    return kt_fail(err, KT_ERR_CACHE_EMPTY,
                   "backward without a saved forward: the saved-state stack is empty "
                   "(max_cache_depth = %d); run forward with save_for_backward=True first",
                   (int)cfg->max_cache_depth);
  }
  const kt_saved *st = args->saved ? args->saved : m->stack[m->depth - 1];
  const kt_routing *rt = &st->rt;
  const int64_t T = rt->num_tokens, R = rt->num_routes;
  if (args->num_tokens != T) {
    pthread_mutex_unlock(&m->lock);
    return kt_fail(err, KT_ERR_INVALID_ARGUMENT,
                   "grad_output has %" PRId64
                   " rows but the saved forward it pairs with had %" PRId64
                   " tokens: expected shape [%" PRId64 ", %" PRId64 "]",
                   args->num_tokens, T, T, H);
  }
  bwd_ctx c = {.m = m,
               .st = st,
               .args = args,
               .n_iblk = (I + KT_BLOCK_N - 1) / KT_BLOCK_N,
               .n_hblk = (H + KT_BLOCK_N - 1) / KT_BLOCK_N,
               .n_tblk = (T + KT_BLOCK_N - 1) / KT_BLOCK_N};
  for (int32_t a = 0; a < rt->n_active; a++) {
    const int32_t e = rt->active[a];
    const int64_t n = rt->offset[e + 1] - rt->offset[e];
    if (n > c.max_routes) c.max_routes = n;
  }
  const int64_t K = H > I ? H : I, Mx = c.max_routes, NB = KT_BLOCK_N;
  const int32_t nthreads = kt_pool_num_threads(m->pool);
  const int few = Mx <= KT_FEW_ROWS;
  /* B2: a few routes per expert, spans of up to KT_WIDE_N columns in one call; more, up to 4
   * blocks (b2_down_act); B4 split by route: one block unless a few routes */
  c.ispan = span_cols(few ? KT_WIDE_N : 4 * KT_BLOCK_N, I, rt->n_active, nthreads);
  c.n_ispan = (I + c.ispan - 1) / c.ispan;
  c.hcols = span_cols(few ? KT_WIDE_N : KT_BLOCK_N, H, rt->n_active, nthreads);
  c.n_hcols = (H + c.hcols - 1) / c.hcols;
  const int64_t wi = min_i64(c.ispan, I), wh = min_i64(c.hcols, H);
  size_t each = m->kern->gemm_scratch_bytes(r, K); /* B1, B3 */
  each = kt_max_size(each, (size_t)(Mx * wi + 5 * Mx * NB + NB * r) * sizeof(float) +
                               kt_base_gemm_scratch_bytes(m->kern, m->wtype, wi, H)); /* B2 */
  /* Items of up to 8 H blocks, while every thread keeps two items and an item's sums stay within
   * 1 MB: an expert's consecutive blocks are adjacent runs of W (2 KB each for bf16, every 64 KB),
   * so the next block's runs are partly fetched already (B4 1.16-1.30x at T = 128 and 1.08-1.30x
   * at T = 1024); int4: one line of group scales serves 8 blocks. */
  c.hspan = 1;
  while (c.hspan < 8 && c.n_hblk >= 4 * c.hspan * nthreads && T * 2 * c.hspan * NB <= 262144)
    c.hspan *= 2;
  const int split_routes = few || kt_split_by_route(c.n_hblk, nthreads);
  if (split_routes) /* b4_input_routes */
    each = kt_max_size(each, (size_t)((2 * Mx + r) * wh) * sizeof(float) +
                                 kt_base_gemm_scratch_bytes(m->kern, m->wtype, wh, I));
  else /* b4_input */
    each = kt_max_size(each, (size_t)((T * c.hspan + 3 * Mx) * NB + NB * r) * sizeof(float) +
                                 kt_base_gemm_scratch_bytes(m->kern, m->wtype, NB, I));
  each = kt_max_size(each, (size_t)H * sizeof(float)); /* B5 */
  c.scratch_each = kt_align_up(each);
  const int go_f32 = args->grad_output_dtype == KT_DTYPE_F32;

  kt_arena wa = {NULL, 0};
  for (int pass = 0; pass < 2; pass++) {
    c.go_converted = go_f32 ? kt_arena_take(&wa, (size_t)(T * H) * 2) : NULL;
    c.q = kt_arena_take(&wa, (size_t)(R * r) * 4);
    c.b_g = kt_arena_take(&wa, (size_t)(R * r) * 4);
    c.b_u = kt_arena_take(&wa, (size_t)(R * r) * 4);
    c.gw_part = kt_arena_take(&wa, (size_t)(R * c.n_iblk) * 4);
    c.dg = kt_arena_take(&wa, (size_t)(R * I) * 2);
    c.du = kt_arena_take(&wa, (size_t)(R * I) * 2);
    c.scratch = kt_arena_take(&wa, c.scratch_each * (size_t)nthreads);
    c.y_route = split_routes ? kt_arena_take(&wa, (size_t)(R * H) * sizeof(float)) : NULL;
    if (pass == 0) {
      wa.base = kt_alloc(wa.used);
      if (!wa.base) {
        pthread_mutex_unlock(&m->lock);
        return kt_fail(err, KT_ERR_OUT_OF_MEMORY,
                       "out of memory for the backward of %" PRId64 " tokens (%zu bytes)", T,
                       wa.used);
      }
      wa.used = 0;
    }
  }
  c.go = go_f32 ? c.go_converted : (const uint16_t *)args->grad_output;

  kt_pool_hold(m->pool, 1);
  if (!args->accumulate) {
    if (args->grads_zeroed)
      kt_moe_run_phase(m, KT_PHASE_BZ, rt->n_active, prefault_routed, &c);
    else
      kt_moe_run_phase(m, KT_PHASE_BZ, cfg->expert_num, zero_unrouted, &c);
    if (args->grad_weights) /* padded routes keep 0; routed ones are written in B3 */
      memset(args->grad_weights, 0, (size_t)(T * cfg->num_experts_per_tok) * sizeof(float));
  }
  const int64_t n_active = rt->n_active;
  if (go_f32) kt_moe_run_phase(m, KT_PHASE_B0, c.n_tblk, b0_convert_go, &c);
  kt_moe_run_phase(m, KT_PHASE_B1, n_active, b1_q, &c);
  kt_moe_run_phase(m, KT_PHASE_B2, n_active * c.n_ispan, b2_down_act, &c);
  kt_moe_run_phase(m, KT_PHASE_B3, n_active, b3_lora_b_and_weights, &c);
  if (split_routes) {
    kt_moe_run_phase(m, KT_PHASE_B4, n_active * c.n_hcols, b4_input_routes, &c);
    kt_moe_run_phase(m, KT_PHASE_B5, T, b5_sum_routes, &c);
  } else {
    kt_moe_run_phase(m, KT_PHASE_B4, (c.n_hblk + c.hspan - 1) / c.hspan, b4_input, &c);
  }
  kt_pool_hold(m->pool, 0);

  kt_free(wa.base);
  if (!args->saved) kt_saved_release(m->stack[--m->depth]);
  kt_moe_add_phase(m, KT_PHASE_BACKWARD, call_start);
  pthread_mutex_unlock(&m->lock);
  return KT_OK;
}
