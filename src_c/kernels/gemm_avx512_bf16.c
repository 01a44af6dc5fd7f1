/* gemm_avx512_bf16.c - x W^T and x W on the vdpbf16ps instruction (built with -mavx512bf16; called
 * only where cpuid reports AVX512_BF16). */
#define KT_DPBF16(acc, a, b) _mm512_dpbf16_ps((acc), (__m512bh)(a), (__m512bh)(b))
#define KT_NT_DP_NAME kt_avx512_nt_bf16_dp
#define KT_NN_DP_NAME kt_avx512_nn_bf16_dp
#include "avx512_nt_dp.h"
