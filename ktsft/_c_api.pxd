# Mirrors src_c/include/ktsft.h, the one public C header.
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t


cdef extern from "ktsft.h" nogil:
    ctypedef enum kt_status:
        KT_OK
        KT_ERR_INVALID_ARGUMENT
        KT_ERR_OUT_OF_MEMORY
        KT_ERR_WEIGHTS_NOT_LOADED
        KT_ERR_CACHE_FULL
        KT_ERR_CACHE_EMPTY
        KT_ERR_EXPERT_ID
        KT_ERR_ISA_UNAVAILABLE
        KT_ERR_THREADS

    ctypedef struct kt_error:
        kt_status status
        char message[512]

    const char *kt_status_string(kt_status status)

    ctypedef enum kt_isa:
        KT_ISA_GENERIC
        KT_ISA_AVX2
        KT_ISA_AVX512
        KT_ISA_AMX
        KT_ISA_AMX_EMU
        KT_ISA_COUNT

    uint32_t kt_cpu_features()
    const char *kt_cpu_feature_name(uint32_t bit)
    const char *kt_cpu_amx_status()
    const char *kt_isa_name(kt_isa isa)
    int kt_isa_compiled(kt_isa isa)
    int kt_isa_available(kt_isa isa)
    kt_isa kt_isa_best()
    kt_status kt_isa_resolve(const char *name, kt_isa *out, kt_error *err)
    const char *kt_isa_variant(kt_isa isa)
    void kt_kernels_testing_set(uint32_t feature_mask, int emulate_bf16)

    ctypedef struct kt_pool:
        pass
    kt_status kt_pool_create(int32_t num_threads, kt_pool **out, kt_error *err)
    void kt_pool_destroy(kt_pool *pool)
    int32_t kt_pool_num_threads(const kt_pool *pool)
    void kt_pool_set_spin(kt_pool *pool, int64_t spin_ns)

    ctypedef enum kt_quant:
        KT_QUANT_BF16
        KT_QUANT_INT8
        KT_QUANT_FP8
        KT_QUANT_INT4

    ctypedef struct kt_moe_config:
        int32_t expert_num
        int32_t num_experts_per_tok
        int32_t hidden_size
        int32_t intermediate_size
        int32_t lora_rank
        float lora_alpha
        int32_t max_len
        int32_t max_cache_depth
        kt_isa isa
        kt_quant quant
        int32_t group_size

    ctypedef struct kt_lora:
        const uint16_t *gate_a
        const uint16_t *gate_b
        const uint16_t *up_a
        const uint16_t *up_b
        const uint16_t *down_a
        const uint16_t *down_b

    ctypedef struct kt_lora_grads:
        uint16_t *gate_a
        uint16_t *gate_b
        uint16_t *up_a
        uint16_t *up_b
        uint16_t *down_a
        uint16_t *down_b

    ctypedef enum kt_dtype:
        KT_DTYPE_F32
        KT_DTYPE_BF16
        KT_DTYPE_INT8
        KT_DTYPE_FP8_E4M3
        KT_DTYPE_INT4

    ctypedef struct kt_saved:
        pass
    void kt_saved_release(kt_saved *saved)
    int64_t kt_saved_num_tokens(const kt_saved *saved)

    ctypedef struct kt_forward_args:
        int64_t num_tokens
        int32_t k
        const int64_t *expert_ids
        const float *weights
        const uint16_t *input
        void *output
        kt_dtype output_dtype
        kt_lora lora
        int save_for_backward
        kt_saved **saved_out

    ctypedef struct kt_backward_args:
        int64_t num_tokens
        const void *grad_output
        kt_dtype grad_output_dtype
        uint16_t *grad_input
        kt_lora_grads grads
        float *grad_weights
        int accumulate
        int grads_zeroed
        kt_lora lora
        const kt_saved *saved

    ctypedef struct kt_expert_weights:
        kt_dtype dtype
        const void *gate_proj
        const void *up_proj
        const void *down_proj
        const float *gate_scale
        const float *up_scale
        const float *down_scale

    ctypedef struct kt_expert_buffers:
        void *gate_proj
        void *up_proj
        void *down_proj
        float *gate_scale
        float *up_scale
        float *down_scale

    ctypedef struct kt_moe:
        pass
    kt_status kt_moe_create(const kt_moe_config *config, kt_pool *pool, kt_moe **out,
                            kt_error *err)
    void kt_moe_destroy(kt_moe *moe)
    kt_status kt_moe_load_weights(kt_moe *moe, const uint16_t *gate_proj,
                                  const uint16_t *up_proj, const uint16_t *down_proj,
                                  kt_error *err)
    kt_status kt_moe_load_experts(kt_moe *moe, int32_t first, int32_t count,
                                  const kt_expert_weights *weights, kt_error *err)
    kt_status kt_moe_read_experts(kt_moe *moe, int32_t first, int32_t count,
                                  const kt_expert_buffers *out, kt_error *err)
    int kt_moe_weights_loaded(const kt_moe *moe)
    int32_t kt_moe_experts_loaded(const kt_moe *moe)
    size_t kt_moe_packed_bytes(const kt_moe *moe)
    kt_isa kt_moe_isa(const kt_moe *moe)
    const char *kt_moe_kernel_variant(const kt_moe *moe)
    kt_status kt_moe_forward(kt_moe *moe, const kt_forward_args *args, kt_error *err)
    kt_status kt_moe_backward(kt_moe *moe, const kt_backward_args *args, kt_error *err)
    int32_t kt_moe_cache_depth(const kt_moe *moe)
    int64_t kt_moe_cache_top_tokens(const kt_moe *moe)
    void kt_moe_cache_clear(kt_moe *moe)

    void kt_vec_sigmoid(kt_isa isa, const float *x, float *y, int64_t n)
    void kt_vec_silu(kt_isa isa, const float *x, float *y, int64_t n)

    ctypedef enum kt_amx_op:
        KT_AMX_TDPBF16PS
        KT_AMX_TDPBSSD
        KT_AMX_TDPBSUD
        KT_AMX_TDPBUSD
        KT_AMX_TDPBUUD

    int kt_amx_emu_ldtilecfg(const void *cfg)
    int kt_amx_emu_sttilecfg(void *cfg)
    int kt_amx_emu_tilerelease()
    int kt_amx_emu_tileloadd(int tile, const void *base, int64_t stride)
    int kt_amx_emu_tilestored(int tile, void *base, int64_t stride)
    int kt_amx_emu_tilezero(int tile)
    int kt_amx_emu_dp(kt_amx_op op, int dst, int a, int b)
    const char *kt_amx_emu_last_fault()
    const char *kt_amx_emu_first_fault()
    void kt_amx_emu_clear_faults()

    ctypedef enum kt_gemm_op:
        KT_GEMM_NT
        KT_GEMM_NT_Q8
        KT_GEMM_NN

    ctypedef enum kt_phase:
        KT_PHASE_COUNT
    const char *kt_phase_name(kt_phase phase)
    void kt_moe_set_profiling(kt_moe *moe, int on)
    void kt_moe_phase_times(kt_moe *moe, double *seconds, int64_t *runs)

    kt_status kt_gemm_test(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale,
                           int64_t m, const void *w, const float *w_scale, int64_t rows,
                           int64_t cols, kt_dtype w_dtype, int64_t n0, int64_t n, float *c,
                           kt_error *err)

    kt_status kt_gemm_test_int4(kt_isa isa, kt_gemm_op op, const void *a, const float *a_scale,
                                int64_t m, const uint8_t *w, const float *w_scale, int64_t rows,
                                int64_t cols, int64_t group, int64_t n0, int64_t n, float *c,
                                kt_error *err)
    kt_status kt_store_bf16_test(kt_isa isa, uint16_t *dst, const float *v, int64_t n,
                                 int accumulate, kt_error *err)
    void kt_int4_quantize(const uint16_t *w, int64_t rows, int64_t cols, int64_t group,
                          uint8_t *q, float *scale)

    void kt_fp8_decode(const uint8_t *q, float *out, int64_t n)
    void kt_fp8_quantize(const uint16_t *w, int64_t rows, int64_t cols, uint8_t *q, float *scale)
