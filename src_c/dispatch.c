/* dispatch.c - the kernel families this build holds and the choice among them (spec 9). */
#include <stdio.h>
#include <string.h>

#include "internal.h"

static const kt_kernels *generic_table(uint32_t features) {
  (void)features;
  return &kt_kernels_generic;
}
#ifdef KT_HAVE_AMX
static const kt_kernels *amx_table(uint32_t features) {
  (void)features;
  return kt_kernels_amx();
}
#define KT_AMX_TABLE_FOR amx_table
#else
#define KT_AMX_TABLE_FOR NULL
#endif

static const kt_kernels *amx_emu_table(uint32_t features) {
  (void)features;
  return &kt_kernels_amx_emu;
}

typedef struct family {
  const char *name;
  uint32_t needs;                           /* every one of these CPU features */
  const kt_kernels *(*table)(uint32_t cpu); /* the variant for these features; NULL: not built */
} family;

/* Ordered from the fastest to the slowest; auto picks the first available. amx-emu is never
 * picked by auto: it is a slow software model for testing. */
static const family families[KT_ISA_COUNT] = {
    [KT_ISA_AMX] = {"amx", KT_CPU_AMX_TILE | KT_CPU_AMX_BF16 | KT_CPU_AMX_INT8, KT_AMX_TABLE_FOR},
    [KT_ISA_AVX512] = {"avx512", KT_CPU_AVX512F | KT_CPU_AVX512BW | KT_CPU_AVX512VL,
                       kt_kernels_avx512},
    [KT_ISA_AVX2] = {"avx2", KT_CPU_AVX2 | KT_CPU_FMA | KT_CPU_F16C, kt_kernels_avx2},
    [KT_ISA_GENERIC] = {"generic", 0, generic_table},
    [KT_ISA_AMX_EMU] = {"amx-emu", 0, amx_emu_table},
};

static const kt_isa auto_order[] = {KT_ISA_AMX, KT_ISA_AVX512, KT_ISA_AVX2, KT_ISA_GENERIC};

static int valid(kt_isa isa) { return (int)isa >= 0 && isa < KT_ISA_COUNT; }

const char *kt_isa_name(kt_isa isa) { return valid(isa) ? families[isa].name : "unknown"; }

int kt_isa_compiled(kt_isa isa) { return valid(isa) && families[isa].table != NULL; }

int kt_isa_available(kt_isa isa) {
  if (!kt_isa_compiled(isa)) return 0;
  const uint32_t needs = families[isa].needs;
  return (kt_cpu_features() & needs) == needs;
}

kt_isa kt_isa_best(void) {
  for (size_t i = 0; i < sizeof auto_order / sizeof auto_order[0]; i++)
    if (kt_isa_available(auto_order[i])) return auto_order[i];
  return KT_ISA_GENERIC;
}

/* Test narrowing of the features the variants are picked from (kt_kernels_testing_set). */
static uint32_t test_mask = UINT32_MAX, test_extra = 0;

void kt_kernels_testing_set(uint32_t feature_mask, int emulate_bf16) {
  __atomic_store_n(&test_mask, feature_mask, __ATOMIC_RELAXED);
  __atomic_store_n(&test_extra, emulate_bf16 ? KT_CPU_TEST_EMULATE_BF16 : 0u, __ATOMIC_RELAXED);
}

const kt_kernels *kt_kernels_for(kt_isa isa) {
  if (!kt_isa_available(isa)) return NULL;
  const uint32_t f = (kt_cpu_features() & __atomic_load_n(&test_mask, __ATOMIC_RELAXED)) |
                     __atomic_load_n(&test_extra, __ATOMIC_RELAXED);
  return families[isa].table(f);
}

const char *kt_isa_variant(kt_isa isa) {
  const kt_kernels *k = kt_kernels_for(isa);
  return k ? k->variant : "";
}

kt_status kt_isa_resolve(const char *name, kt_isa *out, kt_error *err) {
  if (name == NULL || name[0] == '\0' || strcmp(name, "auto") == 0) {
    *out = kt_isa_best();
    return KT_OK;
  }
  char list[128] = "";
  size_t used = 0;
  for (int i = 0; i < KT_ISA_COUNT; i++) {
    if (!kt_isa_available((kt_isa)i)) continue;
    used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "",
                             families[i].name);
    if (used >= sizeof list) break;
  }
  for (int i = 0; i < KT_ISA_COUNT; i++) {
    if (strcmp(name, families[i].name) != 0) continue;
    if (kt_isa_available((kt_isa)i)) {
      *out = (kt_isa)i;
      return KT_OK;
    }
    const char *why = !kt_isa_compiled((kt_isa)i) ? "not built into this library"
                      : i == KT_ISA_AMX           ? kt_cpu_amx_status()
                                                  : "not supported by this CPU";
    return kt_fail(err, KT_ERR_ISA_UNAVAILABLE,
                   "KTSFT_ISA=%s: kernel family '%s' is unavailable: %s; available: auto, %s", name,
                   name, why, list);
  }
  return kt_fail(err, KT_ERR_ISA_UNAVAILABLE,
                 "KTSFT_ISA=%s: unknown kernel family; expected one of auto, amx, avx512, avx2, "
                 "generic, amx-emu; available: auto, %s",
                 name, list);
}

void kt_vec_sigmoid(kt_isa isa, const float *x, float *y, int64_t n) {
  const kt_kernels *k = kt_kernels_for(isa);
  (k ? k : &kt_kernels_generic)->sigmoid(x, y, n);
}

void kt_vec_silu(kt_isa isa, const float *x, float *y, int64_t n) {
  const kt_kernels *k = kt_kernels_for(isa);
  (k ? k : &kt_kernels_generic)->silu(x, y, n);
}
