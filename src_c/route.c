/* route.c - top-k expert ids to per-expert groups of routes (a counting sort, stable in t, j). */
#include <inttypes.h>

#include "moe_internal.h"

size_t kt_routing_bytes(int64_t num_tokens, int32_t k, int32_t expert_num) {
  const size_t routes = (size_t)num_tokens * (size_t)k;
  return kt_align_up((size_t)expert_num * sizeof(int32_t)) +
         kt_align_up(((size_t)expert_num + 1) * sizeof(int64_t)) +
         3 * kt_align_up(routes * sizeof(int32_t)) + kt_align_up(routes * sizeof(float));
}

kt_status kt_routing_build(kt_routing *rt, void *mem, const int64_t *ids, const float *weights,
                           int64_t num_tokens, int32_t k, int32_t expert_num, kt_error *err) {
  const int64_t n = num_tokens * k;
  for (int64_t i = 0; i < n; i++) {
    if (ids[i] < -1 || ids[i] >= expert_num)
      return kt_fail(err, KT_ERR_EXPERT_ID,
                     "expert_ids[%" PRId64 ", %" PRId64 "] = %" PRId64
                     " is out of range: expected -1 (no expert) or 0..%d (expert_num = %d)",
                     i / k, i % k, ids[i], (int)expert_num - 1, (int)expert_num);
  }
  kt_arena a = {mem, 0};
  rt->active = kt_arena_take(&a, (size_t)expert_num * sizeof(int32_t));
  rt->offset = kt_arena_take(&a, ((size_t)expert_num + 1) * sizeof(int64_t));
  rt->token = kt_arena_take(&a, (size_t)n * sizeof(int32_t));
  rt->slot = kt_arena_take(&a, (size_t)n * sizeof(int32_t));
  rt->weight = kt_arena_take(&a, (size_t)n * sizeof(float));
  rt->token_routes = kt_arena_take(&a, (size_t)n * sizeof(int32_t));
  rt->num_tokens = num_tokens;
  rt->k = k;

  int64_t *off = rt->offset;
  for (int32_t e = 0; e <= expert_num; e++) off[e] = 0;
  for (int64_t i = 0; i < n; i++)
    if (ids[i] >= 0) off[ids[i] + 1]++;
  rt->n_active = 0;
  for (int32_t e = 0; e < expert_num; e++) {
    if (off[e + 1] > 0) rt->active[rt->n_active++] = e;
    off[e + 1] += off[e];
  }
  rt->num_routes = off[expert_num];
  /* Fill with a running cursor per expert, then shift the offsets back. */
  for (int64_t i = 0; i < n; i++) {
    if (ids[i] < 0) continue;
    const int64_t pos = off[ids[i]]++;
    rt->token[pos] = (int32_t)(i / k);
    rt->slot[pos] = (int32_t)i;
    rt->weight[pos] = weights[i];
  }
  for (int32_t e = expert_num; e > 0; e--) off[e] = off[e - 1];
  off[0] = 0;
  /* Routes in ascending order are experts in ascending order: each token's list is sorted. */
  for (int64_t i = 0; i < n; i++) rt->token_routes[i] = -1;
  for (int64_t pos = 0; pos < rt->num_routes; pos++) {
    int32_t *list = rt->token_routes + (int64_t)rt->token[pos] * k;
    int32_t j = 0;
    while (list[j] >= 0) j++;
    list[j] = (int32_t)pos;
  }
  return KT_OK;
}

void kt_sum_token_routes(const kt_routing *rt, int64_t t, const float *y_route, int64_t H,
                         float *acc) {
  for (int64_t j = 0; j < H; j++) acc[j] = 0.0f;
  const int32_t *list = rt->token_routes + t * rt->k;
  for (int32_t i = 0; i < rt->k && list[i] >= 0; i++) {
    const float *y = y_route + (int64_t)list[i] * H;
    for (int64_t j = 0; j < H; j++) acc[j] += y[j];
  }
}
