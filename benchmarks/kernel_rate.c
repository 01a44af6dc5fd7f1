/* kernel_rate.c - one thread, one kernel family: the backward's x W and the forward's x W^T over
 * E packed experts W [K, N], for M rows of A, as GB/s of weights read and GFLOP/s. With E = 1 and
 * a small W it stays in cache (the kernel's own rate); with E = 32 of [768, 2048] (96 MB of
 * bf16) every call streams from DRAM (the rate the engine sees at a few routes per expert).
 * x W is called on spans of SPAN columns (the engine's items: 64, or up to 1024 for at most 4
 * rows), x W^T on blocks of 64 rows of W. Best and median of REPS passes over the experts.
 *
 * Build against an editable install's build folder (a development tool; it links the internal
 * kernel table):
 *   B=build/cp311/src_c
 *   cc -O2 -Isrc_c -Isrc_c/include benchmarks/kernel_rate.c $B/libktsft.a \
 *      $B/libktsft_kernels_*.a $B/libktsft.a -lpthread -lm -o /tmp/kernel_rate
 * Usage: /tmp/kernel_rate ISA WTYPE M E [SPAN [K N [REPS]]]
 *   ISA 0 generic, 1 avx2, 2 avx512, 3 amx, 4 amx-emu; WTYPE 0 bf16, 1 int8, 3 int4 (groups of
 *   32); defaults SPAN 64, K 768, N 2048, REPS 5. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s ISA WTYPE M E [SPAN [K N [REPS]]]\n", argv[0]);
    return 2;
  }
  const kt_isa isa = (kt_isa)atoi(argv[1]);
  const kt_wtype wt = (kt_wtype)atoi(argv[2]);
  const int64_t M = atoll(argv[3]), E = atoll(argv[4]);
  const int64_t span = argc > 5 ? atoll(argv[5]) : 64;
  const int64_t K = argc > 7 ? atoll(argv[6]) : 768, N = argc > 7 ? atoll(argv[7]) : 2048;
  const int reps = argc > 8 ? atoi(argv[8]) : 5;
  const int64_t G = 32, ng = (N + G - 1) / G;
  const kt_kernels *kern = kt_kernels_for(isa);
  if (!kern || wt == KT_WTYPE_FP8 || M < 1 || E < 1 || reps < 1 || reps > 1000) {
    fprintf(stderr, "unsupported arguments\n");
    return 2;
  }
  /* W: bf16 values in [1, 2) for bf16; for int8 and int4 the bytes of the same values */
  const size_t pb = kern->packed_bytes(K, N, wt);
  char *packed = kt_alloc_huge(pb * (size_t)E);
  float *scale = kt_alloc(sizeof(float) * (size_t)(K * ng * E));
  uint16_t *src = kt_alloc((size_t)(K * N) * 2);
  if (!packed || !scale || !src) return 1;
  for (int64_t i = 0; i < K * N; i++) src[i] = (uint16_t)((rand() & 0x3fff) | 0x3c00);
  for (int64_t i = 0; i < K * ng * E; i++) scale[i] = 0.01f;
  for (int64_t e = 0; e < E; e++) kern->pack(packed + (size_t)e * pb, src, K, N, wt);
  const int64_t wide = N > K ? N : K;
  uint16_t *a = kt_alloc((size_t)(M * wide) * 2);
  int8_t *aq = kt_alloc((size_t)(M * wide));
  float *as = kt_alloc(sizeof(float) * (size_t)M), *c = kt_alloc(sizeof(float) * (size_t)(M * wide));
  const size_t scratch_bytes = kt_base_gemm_scratch_bytes(kern, wt, span > 64 ? span : 64, wide);
  void *scratch = kt_alloc(scratch_bytes);
  double *t_nn = calloc((size_t)reps, sizeof(double)), *t_nt = calloc((size_t)reps, sizeof(double));
  if (!a || !aq || !as || !c || !scratch || !t_nn || !t_nt) return 1;
  for (int64_t i = 0; i < M * wide; i++) a[i] = 0x3c00, aq[i] = 1;
  for (int64_t i = 0; i < M; i++) as[i] = 1.0f;
  for (int r = 0; r < reps; r++) {
    double t0 = now();
    for (int64_t e = 0; e < E; e++) {
      const kt_packed w = {packed + (size_t)e * pb, K, N, wt,
                           wt == KT_WTYPE_BF16 ? NULL : scale + e * K * ng,
                           wt == KT_WTYPE_INT4 ? G : 0};
      const kt_rows ar = {a, K, NULL, M};
      for (int64_t n0 = 0; n0 < N; n0 += span)
        kt_base_gemm_nn(kern, &ar, &w, n0, N - n0 < span ? N - n0 : span, c, span, scratch);
    }
    double t1 = now();
    for (int64_t e = 0; e < E; e++) {
      const kt_packed w = {packed + (size_t)e * pb, K, N, wt,
                           wt == KT_WTYPE_BF16 ? NULL : scale + e * K * ng,
                           wt == KT_WTYPE_INT4 ? G : 0};
      for (int64_t n0 = 0; n0 < K; n0 += 64) {
        const int64_t n = K - n0 < 64 ? K - n0 : 64;
        if (wt == KT_WTYPE_BF16) {
          const kt_rows ar = {a, N, NULL, M};
          kt_base_gemm_nt(kern, &ar, &w, n0, n, c, 64, scratch);
        } else {
          const kt_rows_q8 ar = {aq, N, NULL, M, as};
          kt_base_gemm_nt_q8(kern, &ar, &w, n0, n, c, 64, scratch);
        }
      }
    }
    t_nn[r] = t1 - t0;
    t_nt[r] = now() - t1;
  }
  qsort(t_nn, (size_t)reps, sizeof(double), cmp);
  qsort(t_nt, (size_t)reps, sizeof(double), cmp);
  const double gb = (double)pb * (double)E / 1e9, gf = 2.0 * (double)(M * K * N * E) / 1e9;
  printf("%s, M=%lld E=%lld [%lld, %lld] span %lld:  x W %.1f GB/s %.1f GFLOP/s (median %.1f GB/s)"
         "  x W^T %.1f GB/s %.1f GFLOP/s (median %.1f GB/s)\n",
         kern->variant, (long long)M, (long long)E, (long long)K, (long long)N, (long long)span,
         gb / t_nn[0], gf / t_nn[0], gb / t_nn[reps / 2], gb / t_nt[0], gf / t_nt[0],
         gb / t_nt[reps / 2]);
  return 0;
}
