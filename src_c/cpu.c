/* cpu.c - what the CPU and the OS let us run: cpuid, XCR0 and, for AMX, Linux's permission. */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static uint64_t read_xcr0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

static char amx_status[192] = "the CPU has no AMX (cpuid leaf 7: AMX-TILE, AMX-BF16, AMX-INT8)";

/* Linux refuses tile instructions until the process asks for the AMX state (kernel >= 5.16);
 * the grant holds for every thread of the process. Before the first tile instruction: the amx
 * family is only chosen after this succeeded. */
static int request_amx_permission(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0) return 1;
  snprintf(amx_status, sizeof amx_status,
           "Linux refused arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): %s (needs kernel "
           ">= 5.16; in a VM the hypervisor must pass AMX through)",
           strerror(errno));
  return 0;
#else
  snprintf(amx_status, sizeof amx_status, "AMX needs Linux's permission request (arch_prctl)");
  return 0;
#endif
}

uint32_t kt_cpu_detect(void) {
  uint32_t a, b, c, d, f = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!osxsave) return 0;
  const uint64_t xcr0 = read_xcr0();
  const int os_avx = (xcr0 & 0x6) == 0x6;                /* XMM and YMM state */
  const int os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0; /* opmask, ZMM hi256, hi16 ZMM */
  const int os_amx = (xcr0 & 0x60000) == 0x60000;        /* XTILECFG, XTILEDATA */
  if (__get_cpuid_max(0, NULL) < 7) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  const uint32_t b7 = b, c7 = c, d7 = d;
  __cpuid_count(7, 1, a, b, c, d);
  const uint32_t a71 = a;
  if (os_avx) {
    if ((b7 >> 5) & 1) f |= KT_CPU_AVX2;
    if (fma) f |= KT_CPU_FMA;
    if (f16c) f |= KT_CPU_F16C;
  }
  if (os_avx512) {
    if ((b7 >> 16) & 1) f |= KT_CPU_AVX512F;
    if ((b7 >> 30) & 1) f |= KT_CPU_AVX512BW;
    if ((b7 >> 31) & 1) f |= KT_CPU_AVX512VL;
    if ((c7 >> 11) & 1) f |= KT_CPU_AVX512_VNNI;
    if ((a71 >> 5) & 1) f |= KT_CPU_AVX512_BF16;
  }
  const int amx_cpu = ((d7 >> 24) & 1) && ((d7 >> 22) & 1) && ((d7 >> 25) & 1);
  if (amx_cpu && !os_amx)
    snprintf(amx_status, sizeof amx_status,
             "the OS has not enabled the AMX tile state (XCR0 bits 17 and 18)");
  if (amx_cpu && os_amx && request_amx_permission()) {
    f |= KT_CPU_AMX_TILE | KT_CPU_AMX_BF16 | KT_CPU_AMX_INT8;
    snprintf(amx_status, sizeof amx_status, "granted");
  }
  return f;
}

const char *kt_cpu_amx_status(void) {
  (void)kt_cpu_features();
  return amx_status;
}
#else
uint32_t kt_cpu_detect(void) { return 0; }

const char *kt_cpu_amx_status(void) { return "AMX needs an x86-64 CPU"; }
#endif

uint32_t kt_cpu_features(void) {
  static int done = 0;
  static uint32_t features = 0;
  if (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) {
    features = kt_cpu_detect();
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
  }
  return features;
}

const char *kt_cpu_feature_name(uint32_t bit) {
  switch (bit) {
    case KT_CPU_AVX2: return "avx2";
    case KT_CPU_FMA: return "fma";
    case KT_CPU_F16C: return "f16c";
    case KT_CPU_AVX512F: return "avx512f";
    case KT_CPU_AVX512BW: return "avx512bw";
    case KT_CPU_AVX512VL: return "avx512vl";
    case KT_CPU_AVX512_BF16: return "avx512_bf16";
    case KT_CPU_AVX512_VNNI: return "avx512_vnni";
    case KT_CPU_AMX_TILE: return "amx_tile";
    case KT_CPU_AMX_BF16: return "amx_bf16";
    case KT_CPU_AMX_INT8: return "amx_int8";
  }
  return NULL;
}
