/* status.c - status strings, error messages and aligned memory. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "internal.h"

const char *kt_status_string(kt_status status) {
  switch (status) {
    case KT_OK: return "success";
    case KT_ERR_INVALID_ARGUMENT: return "invalid argument";
    case KT_ERR_OUT_OF_MEMORY: return "out of memory";
    case KT_ERR_WEIGHTS_NOT_LOADED: return "Weights not loaded";
    case KT_ERR_CACHE_FULL: return "saved-state stack full (max_cache_depth)";
    case KT_ERR_CACHE_EMPTY: return "saved-state stack empty (max_cache_depth)";
    case KT_ERR_EXPERT_ID: return "expert id out of range";
    case KT_ERR_ISA_UNAVAILABLE: return "kernel family unavailable";
    case KT_ERR_THREADS: return "threads could not be started";
  }
  return "unknown status";
}

kt_status kt_fail(kt_error *err, kt_status status, const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    err->status = status;
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
  }
  return status;
}

void *kt_alloc(size_t bytes) {
  if (bytes == 0) return NULL;
  void *p = NULL;
  if (posix_memalign(&p, KT_CACHE_LINE, kt_align_up(bytes)) != 0) return NULL;
  return p;
}

void kt_free(void *p) { free(p); }

void *kt_alloc_huge(size_t bytes) {
  const size_t huge = (size_t)2 << 20;
  if (bytes < huge) return kt_alloc(bytes);
  void *p = NULL;
  if (posix_memalign(&p, huge, (bytes + huge - 1) & ~(huge - 1)) != 0) return NULL;
#if defined(MADV_HUGEPAGE)
  /* The backward reads the weights in short runs far apart: with 4 KB pages nearly every run
   * is a TLB miss. A refusal (THP off) only costs speed. */
  madvise(p, (bytes + huge - 1) & ~(huge - 1), MADV_HUGEPAGE);
#endif
  return p;
}

void kt_prefault(void *p, size_t bytes) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels refuse it with EINVAL */
#endif
  const uintptr_t page = 4096, start = (uintptr_t)p & ~(page - 1);
  const uintptr_t end = ((uintptr_t)p + bytes + page - 1) & ~(page - 1);
  if (bytes) madvise((void *)start, end - start, MADV_POPULATE_WRITE); /* a refusal costs speed */
#else
  (void)p;
  (void)bytes;
#endif
}
