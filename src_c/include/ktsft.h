/*
 * ktsft.h - the one public C header of ktsft.
 *
 * Routed SwiGLU experts with LoRA on gate, up and down: forward, backward (grad input, the six
 * LoRA gradients, the routing-weight gradient), a LIFO stack of saved forward state, and a
 * native thread pool. Shapes and the math are those of the project's spec (sections 2 and 3):
 *
 *   gate_proj, up_proj [E, I, H]  down_proj [E, H, I]                    bf16 or int8, packed at
 * load gate/up_lora_a [E, r, H]  gate/up_lora_b [E, I, r] down_lora_a [E, r, I]  down_lora_b [E, H,
 * r]                        bf16, read at every call
 *
 * bf16 values travel as uint16_t bit patterns. Every function that can fail returns a kt_status
 * and, when `err` is not NULL, writes a message that names the argument and what was expected.
 */
#ifndef KTSFT_H
#define KTSFT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kt_status {
  KT_OK = 0,
  KT_ERR_INVALID_ARGUMENT = 1, /* a size, a count or a pointer is wrong */
  KT_ERR_OUT_OF_MEMORY = 2,
  KT_ERR_WEIGHTS_NOT_LOADED = 3,
  KT_ERR_CACHE_FULL = 4,      /* forward(save) with max_cache_depth entries already saved */
  KT_ERR_CACHE_EMPTY = 5,     /* backward with no saved forward */
  KT_ERR_EXPERT_ID = 6,       /* an expert id outside [-1, E) */
  KT_ERR_ISA_UNAVAILABLE = 7, /* a kernel family this build or this CPU lacks */
  KT_ERR_THREADS = 8          /* the pool's threads could not be started */
} kt_status;

typedef struct kt_error {
  kt_status status;
  char message[512];
} kt_error;

/* A stable one-line description of a status code. */
const char *kt_status_string(kt_status status);

/* ---- kernel families and dispatch (spec section 9) ---------------------------------------- */

typedef enum kt_isa {
  KT_ISA_GENERIC = 0,
  KT_ISA_AVX2 = 1,
  KT_ISA_AVX512 = 2,
  KT_ISA_AMX = 3,
  KT_ISA_AMX_EMU = 4,
  KT_ISA_COUNT = 5
} kt_isa;

/* CPU feature bits reported by kt_cpu_features(): cpuid and the OS (XCR0) both agree. */
enum {
  KT_CPU_AVX2 = 1u << 0,
  KT_CPU_FMA = 1u << 1,
  KT_CPU_F16C = 1u << 2,
  KT_CPU_AVX512F = 1u << 3,
  KT_CPU_AVX512BW = 1u << 4,
  KT_CPU_AVX512VL = 1u << 5,
  KT_CPU_AVX512_BF16 = 1u << 6,
  KT_CPU_AVX512_VNNI = 1u << 7,
  KT_CPU_AMX_TILE = 1u << 8,
  KT_CPU_AMX_BF16 = 1u << 9,
  KT_CPU_AMX_INT8 = 1u << 10
};

uint32_t kt_cpu_features(void);
/* Name of a feature bit ("avx512_bf16", ...), NULL for an unknown bit. */
const char *kt_cpu_feature_name(uint32_t bit);

/* Whether the amx family may run here: "granted", or why not (no AMX in cpuid, the OS has not
 * enabled the tile state in XCR0, or Linux refused the permission request, with its error). */
const char *kt_cpu_amx_status(void);

const char *kt_isa_name(kt_isa isa);
/* 1 when the family's kernels are built into this library. */
int kt_isa_compiled(kt_isa isa);
/* 1 when the family is compiled and this CPU and OS can run it. */
int kt_isa_available(kt_isa isa);
/* The best available family. */
kt_isa kt_isa_best(void);
/* Resolves "auto" or a family name to an available family; KT_ERR_ISA_UNAVAILABLE otherwise,
 * with a message listing the available ones. */
kt_status kt_isa_resolve(const char *name, kt_isa *out, kt_error *err);
/* The instructions a family uses on this CPU, e.g. "avx512-fma+vnni" (vdpbf16ps or fp32 FMA for
 * bf16, vpdpbusd or vpmaddwd for int8); "" when the family is unavailable. */
const char *kt_isa_variant(kt_isa isa);
/* Testing: engines created afterwards pick their family's variant as if the CPU had only the
 * features in feature_mask (never more than it has) and, with emulate_bf16, run the vdpbf16ps
 * code of the avx512 family on a software model of the instruction. (UINT32_MAX, 0) restores. */
void kt_kernels_testing_set(uint32_t feature_mask, int emulate_bf16);

/* ---- thread pool --------------------------------------------------------------------------- */

typedef struct kt_pool kt_pool;

/* num_threads >= 1 threads in all: the calling thread and num_threads - 1 workers. */
kt_status kt_pool_create(int32_t num_threads, kt_pool **out, kt_error *err);
void kt_pool_destroy(kt_pool *pool);
int32_t kt_pool_num_threads(const kt_pool *pool);
/* How long a waiting thread spins before it sleeps, in nanoseconds (<= 0: sleep at once): a
 * worker between the phases of a forward or backward, the caller for the workers at the end of a
 * phase. Between calls the workers sleep at once. Default 100000. */
void kt_pool_set_spin(kt_pool *pool, int64_t spin_ns);

/* ---- the MoE engine ------------------------------------------------------------------------ */

/* How the engine stores the frozen base weights (spec section 5). */
typedef enum kt_quant {
  KT_QUANT_BF16 = 0, /* as given */
  KT_QUANT_INT8 = 1, /* int8, one fp32 scale per output row, quantized at load */
  KT_QUANT_FP8 = 2,  /* e4m3, one fp32 scale per 128 x 128 block (spec section 5.1) */
  KT_QUANT_INT4 = 3  /* signed 4-bit, one fp32 scale per row and group_size columns (5.2) */
} kt_quant;

typedef struct kt_moe_config {
  int32_t expert_num;          /* E */
  int32_t num_experts_per_tok; /* k */
  int32_t hidden_size;         /* H */
  int32_t intermediate_size;   /* I */
  int32_t lora_rank;           /* r */
  float lora_alpha;            /* scale s = lora_alpha / r */
  int32_t max_len;             /* largest T of one call */
  int32_t max_cache_depth;     /* saved forward states that may be pending at once */
  kt_isa isa;                  /* kernel family; must be available */
  kt_quant quant;              /* base-weight storage */
  int32_t group_size;          /* KT_QUANT_INT4: columns per scale, 32, 64 or 128 (0: 32) */
} kt_moe_config;

/* The six LoRA tensors, in the caller's memory (contiguous, bf16, spec section 2 shapes). */
typedef struct kt_lora {
  const uint16_t *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;
} kt_lora;

/* The six LoRA gradient buffers (same shapes as kt_lora, bf16). */
typedef struct kt_lora_grads {
  uint16_t *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;
} kt_lora_grads;

typedef enum kt_dtype {
  KT_DTYPE_F32 = 0,
  KT_DTYPE_BF16 = 1,
  KT_DTYPE_INT8 = 2,
  KT_DTYPE_FP8_E4M3 = 3, /* float8_e4m3fn bytes */
  KT_DTYPE_INT4 = 4      /* two signed 4-bit values per byte, the low nibble first */
} kt_dtype;

/* Saved forward state owned by the caller (see kt_forward_args.saved_out). */
typedef struct kt_saved kt_saved;
void kt_saved_release(kt_saved *saved);
/* Tokens of the forward a handle was saved from. */
int64_t kt_saved_num_tokens(const kt_saved *saved);

typedef struct kt_forward_args {
  int64_t num_tokens;        /* T, 1..max_len */
  int32_t k;                 /* must equal num_experts_per_tok */
  const int64_t *expert_ids; /* [T, k]; -1 = no expert */
  const float *weights;      /* [T, k] routing weights */
  const uint16_t *input;     /* [T, H] bf16 */
  void *output;              /* [T, H], overwritten */
  kt_dtype output_dtype;     /* F32 or BF16 */
  kt_lora lora;
  int save_for_backward; /* keep the state backward needs: */
  /* NULL: push it onto the engine's LIFO stack (max_cache_depth entries at most).
   * Otherwise: hand it to the caller in *saved_out, outside the stack and its depth limit; the
   * caller passes it to backward and frees it with kt_saved_release. */
  kt_saved **saved_out;
} kt_forward_args;

typedef struct kt_backward_args {
  int64_t num_tokens;         /* T of the saved forward (checked) */
  const void *grad_output;    /* [T, H] */
  kt_dtype grad_output_dtype; /* BF16 or F32 */
  uint16_t *grad_input;       /* [T, H] bf16 */
  kt_lora_grads grads;
  float *grad_weights; /* [T, k], or NULL when not wanted */
  int accumulate;      /* 0: overwrite every element; 1: add into the buffers */
  /* Overwrite mode only: the six LoRA gradient buffers are known to hold zeros (e.g. fresh
   * zero-mapped pages), so the experts without tokens are left untouched instead of zeroed. */
  int grads_zeroed;
  kt_lora lora;
  /* NULL: pop the newest state of the stack. Otherwise a handle from forward's saved_out, which
   * stays valid (backward may run on it again) until kt_saved_release. */
  const kt_saved *saved;
} kt_backward_args;

/* Base weights of `count` consecutive experts, as the caller holds them (row-major):
 *   BF16: gate_proj, up_proj [count, I, H], down_proj [count, H, I] bf16; scales unused.
 *   INT8: the same shapes in int8 plus their per-row scales gate_scale, up_scale [count, I] and
 *         down_scale [count, H] (float32): weight = int8 value * scale of its row.
 *   FP8_E4M3: the same shapes in e4m3 bytes plus their block scales (DeepSeek's weight_scale_inv)
 *         gate_scale, up_scale [count, ceil(I/128), ceil(H/128)] and down_scale [count,
 *         ceil(H/128), ceil(I/128)]: W[n, c] = e4m3(q[n, c]) * scale[n / 128, c / 128].
 *   INT4: gate_proj, up_proj [count, I, ceil(H/2)], down_proj [count, H, ceil(I/2)] bytes, two
 *         signed nibbles (-8 .. 7) per byte, the low nibble the even column (a row's last high
 *         nibble is 0 when the row is odd), plus the group scales gate_scale, up_scale [count, I,
 *         ceil(H/G)] and down_scale [count, H, ceil(I/G)], G = group_size:
 *         W[n, c] = q[n, c] * scale[n, c / G]. */
typedef struct kt_expert_weights {
  kt_dtype dtype; /* KT_DTYPE_BF16, KT_DTYPE_INT8, KT_DTYPE_FP8_E4M3 or KT_DTYPE_INT4 */
  const void *gate_proj, *up_proj, *down_proj;
  const float *gate_scale, *up_scale, *down_scale;
} kt_expert_weights;

/* Caller buffers the packed base weights are read back into, shapes as in kt_expert_weights:
 * bf16 in KT_QUANT_BF16 mode, int8 plus row scales in KT_QUANT_INT8 mode, e4m3 bytes plus block
 * scales in KT_QUANT_FP8 mode, int4 bytes plus group scales in KT_QUANT_INT4 mode. */
typedef struct kt_expert_buffers {
  void *gate_proj, *up_proj, *down_proj;
  float *gate_scale, *up_scale, *down_scale;
} kt_expert_buffers;

typedef struct kt_moe kt_moe;

/* The pool must outlive the engine. */
kt_status kt_moe_create(const kt_moe_config *config, kt_pool *pool, kt_moe **out, kt_error *err);
void kt_moe_destroy(kt_moe *moe);

/* Packs the bf16 base weights of all E experts into the engine's own layout (quantizing them in
 * KT_QUANT_INT8 mode); the caller may free them after. */
kt_status kt_moe_load_weights(kt_moe *moe, const uint16_t *gate_proj, const uint16_t *up_proj,
                              const uint16_t *down_proj, kt_error *err);
/* Packs experts [first, first + count): bf16 weights in any mode (quantized in INT8, FP8 and
 * INT4 mode), or int8 weights and scales in INT8 mode, or e4m3 weights and block scales in FP8
 * mode, or int4 weights and group scales in INT4 mode, used as they are (fp8 and int4 scales
 * must be finite: a NaN or Inf scale is an error and loads nothing).
 * Loading expert by expert keeps the caller's peak memory at one expert beyond the packed copy.
 * Reloading an expert replaces it. */
kt_status kt_moe_load_experts(kt_moe *moe, int32_t first, int32_t count,
                              const kt_expert_weights *weights, kt_error *err);
/* Reads experts [first, first + count) back from the packed copy (see kt_expert_buffers). */
kt_status kt_moe_read_experts(kt_moe *moe, int32_t first, int32_t count,
                              const kt_expert_buffers *out, kt_error *err);
/* 1 once every expert is loaded; the number loaded so far. */
int kt_moe_weights_loaded(const kt_moe *moe);
int32_t kt_moe_experts_loaded(const kt_moe *moe);
/* Bytes held by the packed base weights and their scales (the full E experts once any is
 * loaded). */
size_t kt_moe_packed_bytes(const kt_moe *moe);
kt_isa kt_moe_isa(const kt_moe *moe);
/* The kernel variant the engine runs (see kt_isa_variant). */
const char *kt_moe_kernel_variant(const kt_moe *moe);

/* A failing call changes no state: nothing is pushed, popped or half-written. */
kt_status kt_moe_forward(kt_moe *moe, const kt_forward_args *args, kt_error *err);
/* Uses args->saved, or pops the newest saved forward of the stack. */
kt_status kt_moe_backward(kt_moe *moe, const kt_backward_args *args, kt_error *err);

/* ---- the engine's phase timers (off by default; a branch per phase when off) -------------- */

/* The parallel phases of forward and backward (moe_fwd.c, moe_bwd.c), and the two whole calls. */
typedef enum kt_phase {
  KT_PHASE_FORWARD = 0, /* whole forward calls, setup (routing, allocation) included */
  KT_PHASE_FQ,          /* int8: x quantized per token */
  KT_PHASE_F0,          /* x A_g^T, x A_u^T */
  KT_PHASE_F1,          /* gate and up projections, SwiGLU */
  KT_PHASE_F2,          /* h A_d^T (int8: h quantized per route) */
  KT_PHASE_F3,          /* down projection, routes summed per token */
  KT_PHASE_F4,          /* route split only: each token's routes summed */
  KT_PHASE_BACKWARD,    /* whole backward calls */
  KT_PHASE_BZ,          /* gradient buffers: experts without routes zeroed, or pages mapped */
  KT_PHASE_B0,          /* float32 grad_output to bf16 */
  KT_PHASE_B1,          /* dy B_d */
  KT_PHASE_B2,          /* dy W_d, activation backward, dA_d, dB_g, dB_u */
  KT_PHASE_B3,          /* dg B_g, du B_u, grad_weights */
  KT_PHASE_B4,          /* dg W_g + du W_u (+ LoRA), dA_g, dA_u, dB_d */
  KT_PHASE_B5,          /* route split only: each token's routes summed */
  KT_PHASE_COUNT
} kt_phase;

/* "F1", "forward", ... */
const char *kt_phase_name(kt_phase phase);
/* Switches the timers on (and zeroes them) or off. */
void kt_moe_set_profiling(kt_moe *moe, int on);
/* Seconds spent in, and runs of, each phase since profiling was switched on. */
void kt_moe_phase_times(kt_moe *moe, double seconds[KT_PHASE_COUNT], int64_t runs[KT_PHASE_COUNT]);

/* Saved forward states now on the stack, and the token count of the newest (0 when empty). */
int32_t kt_moe_cache_depth(const kt_moe *moe);
int64_t kt_moe_cache_top_tokens(const kt_moe *moe);
/* Drops every saved state. */
void kt_moe_cache_clear(kt_moe *moe);

/* ---- vector math, exposed for tests ------------------------------------------------------- */

/* y[i] = sigmoid(x[i]) and y[i] = silu(x[i]) with the selected family's routines. */
void kt_vec_sigmoid(kt_isa isa, const float *x, float *y, int64_t n);
void kt_vec_silu(kt_isa isa, const float *x, float *y, int64_t n);

/* ---- one kernel GEMM, exposed for tests ---------------------------------------------------- */

typedef enum kt_gemm_op {
  KT_GEMM_NT = 0,    /* C = A W^T, A bf16 [m, cols], W bf16 or fp8 */
  KT_GEMM_NT_Q8 = 1, /* C = (a_scale A) (w_scale W)^T, A int8 [m, cols], W int8 */
  KT_GEMM_NN = 2     /* C = A W, A bf16 [m, rows], W bf16, int8 or fp8 */
} kt_gemm_op;

/* Packs W [rows, cols] (w_dtype: bf16 bits; int8 with w_scale [rows]; e4m3 bytes with the
 * block scales w_scale [ceil(rows/128), ceil(cols/128)]) in the family's layout and writes the
 * output columns [n0, n0 + n) of the product into c [m, n] (fp32). n0 must be a multiple of 64. */
kt_status kt_gemm_test(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale, int64_t m,
                       const void *w, const float *w_scale, int64_t rows, int64_t cols,
                       kt_dtype w_dtype, int64_t n0, int64_t n, float *c, kt_error *err);

/* kt_gemm_test on int4 weights (KT_DTYPE_INT4 bytes, the layout of kt_expert_weights) with the
 * group scales w_scale [rows, ceil(cols/group)]: op KT_GEMM_NT_Q8 (int8 A with a_scale, W4A8)
 * or KT_GEMM_NN (bf16 A). */
kt_status kt_gemm_test_int4(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale,
                            int64_t m, const uint8_t *w, const float *w_scale, int64_t rows,
                            int64_t cols, int64_t group, int64_t n0, int64_t n, float *c,
                            kt_error *err);

/* dst[i] = bf16(v[i]), or bf16(bf16 dst[i] + v[i]) with accumulate, by the family's store (the
 * engine's stores of outputs and gradients: every family's gives the bits of the portable one). */
kt_status kt_store_bf16_test(kt_isa isa, uint16_t *dst, const float *v, int64_t n, int accumulate,
                             kt_error *err);

/* The quantizer of spec section 5.2 on a bf16 [rows, cols] matrix: q [rows, ceil(cols/2)] int4
 * bytes (as kt_expert_weights holds them) and scale [rows, ceil(cols/group)]. */
void kt_int4_quantize(const uint16_t *w, int64_t rows, int64_t cols, int64_t group, uint8_t *q,
                      float *scale);

/* ---- fp8 e4m3 conversions, exposed for tests ---------------------------------------------- */

/* out[i] = the value of e4m3 byte q[i] (NaN for 0x7f and 0xff). */
void kt_fp8_decode(const uint8_t *q, float *out, int64_t n);
/* The quantizer of spec section 5.1 on a bf16 [rows, cols] matrix: q [rows, cols] e4m3 bytes and
 * scale [ceil(rows/128), ceil(cols/128)]. */
void kt_fp8_quantize(const uint16_t *w, int64_t rows, int64_t cols, uint8_t *q, float *scale);

/* ---- the AMX software model (amx-emu), exposed for tests --------------------------------- */

/* One modelled instruction on the calling thread's tile state (8 tiles of 16 rows x 64 bytes and
 * a 64-byte configuration, like the hardware's). Each returns 0, or -1 after a fault (#GP, #UD on
 * hardware): the destination is left unchanged, kt_amx_emu_last_fault() says why, and the first
 * fault of the process is kept for kt_amx_emu_first_fault(). */
typedef enum kt_amx_op {
  KT_AMX_TDPBF16PS = 0, /* bf16 pairs, fp32 accumulation */
  KT_AMX_TDPBSSD = 1,   /* int8 quads, a signed, b signed, int32 accumulation */
  KT_AMX_TDPBSUD = 2,   /* a signed, b unsigned */
  KT_AMX_TDPBUSD = 3,   /* a unsigned, b signed */
  KT_AMX_TDPBUUD = 4    /* a unsigned, b unsigned */
} kt_amx_op;

int kt_amx_emu_ldtilecfg(const void *cfg);
int kt_amx_emu_sttilecfg(void *cfg);
int kt_amx_emu_tilerelease(void);
int kt_amx_emu_tileloadd(int tile, const void *base, int64_t stride);
int kt_amx_emu_tilestored(int tile, void *base, int64_t stride);
int kt_amx_emu_tilezero(int tile);
int kt_amx_emu_dp(kt_amx_op op, int dst, int a, int b);
/* The calling thread's last fault ("" when none). */
const char *kt_amx_emu_last_fault(void);
/* The first fault of any thread since the last clear (NULL when none): amx-emu kernels that
 * fault also fill their output with NaN. */
const char *kt_amx_emu_first_fault(void);
void kt_amx_emu_clear_faults(void);

#ifdef __cplusplus
}
#endif
#endif /* KTSFT_H */
