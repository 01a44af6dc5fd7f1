"""Thin Cython layer over the C library: pointers in, GIL released, status codes to exceptions.

Arguments are validated by the Python layer (:mod:`ktsft.moe`, :mod:`ktsft.kt_kernel_ext`);
this module only turns integers (addresses from ``data_ptr()`` / ``ctypes.data``) into C
pointers and C status codes into Python exceptions.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t

from ktsft._c_api cimport (
    KT_AMX_TDPBF16PS, KT_AMX_TDPBSSD, KT_AMX_TDPBSUD, KT_AMX_TDPBUSD, KT_AMX_TDPBUUD, KT_DTYPE_BF16,
    KT_DTYPE_F32, KT_DTYPE_FP8_E4M3, KT_DTYPE_INT4, KT_DTYPE_INT8, KT_ERR_CACHE_EMPTY,
    KT_ERR_CACHE_FULL, KT_ERR_EXPERT_ID, KT_ERR_INVALID_ARGUMENT, KT_ERR_ISA_UNAVAILABLE,
    KT_ERR_OUT_OF_MEMORY, KT_ERR_WEIGHTS_NOT_LOADED, KT_GEMM_NN, KT_GEMM_NT, KT_GEMM_NT_Q8,
    KT_ISA_COUNT, KT_OK, KT_PHASE_COUNT, KT_QUANT_BF16, KT_QUANT_FP8, KT_QUANT_INT4, KT_QUANT_INT8,
    kt_amx_emu_clear_faults, kt_amx_emu_dp, kt_amx_emu_first_fault, kt_amx_emu_last_fault,
    kt_amx_emu_ldtilecfg, kt_amx_emu_sttilecfg, kt_amx_emu_tileloadd, kt_amx_emu_tilerelease,
    kt_amx_emu_tilestored, kt_amx_emu_tilezero, kt_amx_op, kt_backward_args, kt_cpu_amx_status,
    kt_cpu_feature_name, kt_cpu_features, kt_dtype, kt_error, kt_expert_buffers, kt_expert_weights,
    kt_forward_args, kt_fp8_decode, kt_fp8_quantize, kt_gemm_op, kt_gemm_test, kt_gemm_test_int4,
    kt_store_bf16_test,
    kt_int4_quantize, kt_isa, kt_isa_available, kt_isa_best, kt_isa_compiled, kt_isa_name,
    kt_isa_resolve, kt_isa_variant, kt_kernels_testing_set, kt_lora, kt_moe, kt_moe_backward,
    kt_moe_cache_clear, kt_moe_cache_depth, kt_moe_cache_top_tokens, kt_moe_config, kt_moe_create,
    kt_moe_destroy, kt_moe_experts_loaded, kt_moe_forward, kt_moe_isa, kt_moe_kernel_variant,
    kt_moe_load_experts, kt_moe_load_weights, kt_moe_packed_bytes, kt_moe_phase_times,
    kt_moe_read_experts, kt_moe_set_profiling, kt_moe_weights_loaded, kt_phase, kt_phase_name,
    kt_pool, kt_pool_create, kt_pool_destroy, kt_pool_num_threads, kt_pool_set_spin, kt_quant,
    kt_saved, kt_saved_num_tokens, kt_saved_release, kt_status, kt_status_string, kt_vec_sigmoid,
    kt_vec_silu,
)


class ISAUnavailableError(ValueError):
    """A kernel family that this build or this CPU lacks was requested."""


class EngineStateError(ValueError, RuntimeError):
    """A call the engine's state does not allow: weights not loaded, saved-state stack full
    (forward with ``save_for_backward``) or empty (backward). A ValueError as spec section 7
    asks of the Python API, and a RuntimeError as the predecessor raised."""


cdef object _raise(kt_status status, kt_error *err):
    if err.status == status:
        msg = err.message.decode("utf-8", "replace")
    else:  # a path that set no message: the stable status string still says what failed
        msg = kt_status_string(status).decode()
    if status == KT_ERR_INVALID_ARGUMENT or status == KT_ERR_EXPERT_ID:
        raise ValueError(msg)
    if status == KT_ERR_ISA_UNAVAILABLE:
        raise ISAUnavailableError(msg)
    if status == KT_ERR_OUT_OF_MEMORY:
        raise MemoryError(msg)
    if status in (KT_ERR_WEIGHTS_NOT_LOADED, KT_ERR_CACHE_FULL, KT_ERR_CACHE_EMPTY):
        raise EngineStateError(msg)
    raise RuntimeError(msg)


cdef kt_isa _resolve(str name) except *:
    cdef kt_isa isa
    cdef kt_error err
    cdef bytes raw = name.encode()
    cdef kt_status st = kt_isa_resolve(raw, &isa, &err)
    if st != KT_OK:
        _raise(st, &err)
    return isa


def resolve_isa(str name):
    """The kernel family that ``name`` ("auto" or a family name) selects on this machine."""
    return kt_isa_name(_resolve(name)).decode()


def isa_lists():
    """(compiled, available, best): the families built in, those this CPU runs, the auto pick."""
    compiled = [kt_isa_name(<kt_isa>i).decode() for i in range(KT_ISA_COUNT)
                if kt_isa_compiled(<kt_isa>i)]
    available = [kt_isa_name(<kt_isa>i).decode() for i in range(KT_ISA_COUNT)
                 if kt_isa_available(<kt_isa>i)]
    return compiled, available, kt_isa_name(kt_isa_best()).decode()


def isa_variant(str name):
    """The instructions the family ``name`` ("auto" or a family name) uses on this CPU."""
    return kt_isa_variant(_resolve(name)).decode()


def kernels_testing_set(uint32_t feature_mask, bint emulate_bf16):
    """Tests only: engines created afterwards pick their kernel variant as if the CPU had only
    ``feature_mask`` (bits of :func:`cpu_features`), with ``emulate_bf16`` the avx512 family's
    vdpbf16ps code on a software model. ``(0xFFFFFFFF, False)`` restores."""
    kt_kernels_testing_set(feature_mask, emulate_bf16)


def cpu_features():
    """Names of the CPU features that both cpuid and the OS enable."""
    cdef uint32_t bits = kt_cpu_features()
    out = []
    for i in range(32):
        if bits & (1u << i):
            out.append(kt_cpu_feature_name(1u << i).decode())
    return out


def vec_act(str kind, str isa, uintptr_t x, uintptr_t y, int64_t n):
    """y = sigmoid(x) or silu(x) over n float32 values (for tests of the vector math)."""
    cdef kt_isa family = _resolve(isa)
    if kind == "sigmoid":
        with nogil:
            kt_vec_sigmoid(family, <const float *>x, <float *>y, n)
    elif kind == "silu":
        with nogil:
            kt_vec_silu(family, <const float *>x, <float *>y, n)
    else:
        raise ValueError(f"kind must be 'sigmoid' or 'silu', got {kind!r}")


_GEMM_OPS = {"nt": KT_GEMM_NT, "nt_q8": KT_GEMM_NT_Q8, "nn": KT_GEMM_NN}
_WEIGHT_DTYPES = {
    "bf16": KT_DTYPE_BF16, "int8": KT_DTYPE_INT8, "fp8": KT_DTYPE_FP8_E4M3, "int4": KT_DTYPE_INT4,
}


cdef kt_dtype _weight_dtype(str name) except *:
    if name not in _WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {sorted(_WEIGHT_DTYPES)}, got {name!r}")
    return <kt_dtype>_WEIGHT_DTYPES[name]


def gemm_test(str isa, str op, uintptr_t a, uintptr_t a_scale, int64_t m, uintptr_t w,
              uintptr_t w_scale, int64_t rows, int64_t cols, str w_dtype, int64_t n0, int64_t n,
              uintptr_t c, int64_t group=0):
    """One kernel GEMM of a family ("nt", "nt_q8" or "nn"; W "bf16", "int8", "fp8" or "int4"
    with its group size; see kt_gemm_test and kt_gemm_test_int4), for tests."""
    if op not in _GEMM_OPS:
        raise ValueError(f"op must be one of {sorted(_GEMM_OPS)}, got {op!r}")
    cdef kt_isa family = _resolve(isa)
    cdef kt_gemm_op g = <kt_gemm_op>_GEMM_OPS[op]
    cdef kt_dtype wt = _weight_dtype(w_dtype)
    cdef kt_error err
    cdef kt_status st
    with nogil:
        if wt == KT_DTYPE_INT4:
            st = kt_gemm_test_int4(family, g, <const void *>a, <const float *>a_scale, m,
                                   <const uint8_t *>w, <const float *>w_scale, rows, cols, group,
                                   n0, n, <float *>c, &err)
        else:
            st = kt_gemm_test(family, g, <const void *>a, <const float *>a_scale, m,
                              <const void *>w, <const float *>w_scale, rows, cols, wt, n0, n,
                              <float *>c, &err)
    if st != KT_OK:
        _raise(st, &err)


def store_bf16_test(str isa, uintptr_t dst, uintptr_t v, int64_t n, bint accumulate):
    """dst[i] (bf16 bits) = v[i] (float32) rounded, or dst[i] + v[i] with accumulate, by the
    family's store (for tests)."""
    cdef kt_isa family = _resolve(isa)
    cdef kt_error err
    cdef kt_status st
    with nogil:
        st = kt_store_bf16_test(family, <uint16_t *>dst, <const float *>v, n, accumulate, &err)
    if st != KT_OK:
        _raise(st, &err)


def fp8_decode(uintptr_t q, uintptr_t out, int64_t n):
    """out[i] (float32) = the value of e4m3 byte q[i], the engine's decoder (for tests)."""
    with nogil:
        kt_fp8_decode(<const uint8_t *>q, <float *>out, n)


def fp8_quantize(uintptr_t w, int64_t rows, int64_t cols, uintptr_t q, uintptr_t scale):
    """The engine's fp8 quantizer on a bf16 [rows, cols] matrix: e4m3 bytes q [rows, cols] and
    block scales [ceil(rows/128), ceil(cols/128)] float32 (for tests)."""
    with nogil:
        kt_fp8_quantize(<const uint16_t *>w, rows, cols, <uint8_t *>q, <float *>scale)


def int4_quantize(uintptr_t w, int64_t rows, int64_t cols, int64_t group, uintptr_t q,
                  uintptr_t scale):
    """The engine's int4 quantizer on a bf16 [rows, cols] matrix: q [rows, ceil(cols/2)] uint8
    (two nibbles a byte, low first) and scales [rows, ceil(cols/group)] float32 (for tests)."""
    with nogil:
        kt_int4_quantize(<const uint16_t *>w, rows, cols, group, <uint8_t *>q, <float *>scale)


def amx_status():
    """Whether the amx family may run here: "granted", or why not."""
    return kt_cpu_amx_status().decode()


# ---- the AMX software model (amx-emu), for tests --------------------------------------------


class AMXFault(RuntimeError):
    """A modelled tile instruction faulted (#GP or #UD on hardware)."""


cdef int _emu(int rc) except -1:
    if rc != 0:
        raise AMXFault(kt_amx_emu_last_fault().decode())
    return 0


_AMX_OPS = {
    "tdpbf16ps": KT_AMX_TDPBF16PS, "tdpbssd": KT_AMX_TDPBSSD, "tdpbsud": KT_AMX_TDPBSUD,
    "tdpbusd": KT_AMX_TDPBUSD, "tdpbuud": KT_AMX_TDPBUUD,
}


def amx_emu_ldtilecfg(uintptr_t cfg):
    """ldtilecfg from the 64 bytes at cfg, on this thread's modelled tile state."""
    _emu(kt_amx_emu_ldtilecfg(<const void *>cfg))


def amx_emu_sttilecfg(uintptr_t cfg):
    """sttilecfg into the 64 bytes at cfg."""
    _emu(kt_amx_emu_sttilecfg(<void *>cfg))


def amx_emu_tilerelease():
    _emu(kt_amx_emu_tilerelease())


def amx_emu_tileloadd(int tile, uintptr_t base, int64_t stride):
    _emu(kt_amx_emu_tileloadd(tile, <const void *>base, stride))


def amx_emu_tilestored(int tile, uintptr_t base, int64_t stride):
    _emu(kt_amx_emu_tilestored(tile, <void *>base, stride))


def amx_emu_tilezero(int tile):
    _emu(kt_amx_emu_tilezero(tile))


def amx_emu_dp(str op, int dst, int a, int b):
    """One of tdpbf16ps, tdpbssd, tdpbsud, tdpbusd, tdpbuud: dst += a . b."""
    if op not in _AMX_OPS:
        raise ValueError(f"op must be one of {sorted(_AMX_OPS)}, got {op!r}")
    _emu(kt_amx_emu_dp(<kt_amx_op>_AMX_OPS[op], dst, a, b))


def amx_emu_first_fault():
    """The first fault of any thread since amx_emu_clear_faults(), or None."""
    cdef const char *msg = kt_amx_emu_first_fault()
    return None if msg == NULL else msg.decode()


def amx_emu_clear_faults():
    kt_amx_emu_clear_faults()


cdef class Pool:
    """Native worker threads (the calling thread plus ``num_threads - 1`` workers)."""
    cdef kt_pool *ptr

    def __cinit__(self, int32_t num_threads):
        cdef kt_error err
        cdef kt_status st
        with nogil:
            st = kt_pool_create(num_threads, &self.ptr, &err)
        if st != KT_OK:
            _raise(st, &err)

    def __dealloc__(self):
        if self.ptr is not NULL:
            with nogil:
                kt_pool_destroy(self.ptr)
            self.ptr = NULL

    @property
    def num_threads(self):
        return kt_pool_num_threads(self.ptr)

    def set_spin(self, int64_t spin_ns):
        kt_pool_set_spin(self.ptr, spin_ns)


cdef kt_lora _lora(tuple p):
    cdef kt_lora l
    l.gate_a = <const uint16_t *><uintptr_t>p[0]
    l.gate_b = <const uint16_t *><uintptr_t>p[1]
    l.up_a = <const uint16_t *><uintptr_t>p[2]
    l.up_b = <const uint16_t *><uintptr_t>p[3]
    l.down_a = <const uint16_t *><uintptr_t>p[4]
    l.down_b = <const uint16_t *><uintptr_t>p[5]
    return l


cdef class SavedState:
    """What one forward saved for its backward, owned by the caller instead of the engine's
    stack; freed when released or garbage-collected."""
    cdef kt_saved *ptr
    cdef readonly Engine engine

    def __dealloc__(self):
        kt_saved_release(self.ptr)
        self.ptr = NULL

    def release(self):
        """Frees the saved state now; later backward calls with it raise."""
        kt_saved_release(self.ptr)
        self.ptr = NULL

    @property
    def released(self):
        return self.ptr is NULL

    @property
    def num_tokens(self):
        return kt_saved_num_tokens(self.ptr)


cdef class Engine:
    """One MoE layer's engine: packed base weights and the saved-state stack."""
    cdef kt_moe *ptr
    cdef Pool pool

    def __cinit__(self, Pool pool, int32_t expert_num, int32_t num_experts_per_tok,
                  int32_t hidden_size, int32_t intermediate_size, int32_t lora_rank,
                  float lora_alpha, int32_t max_len, int32_t max_cache_depth, str isa,
                  str quant="bf16", int32_t group_size=32):
        cdef kt_moe_config c
        cdef kt_error err
        c.expert_num = expert_num
        c.num_experts_per_tok = num_experts_per_tok
        c.hidden_size = hidden_size
        c.intermediate_size = intermediate_size
        c.lora_rank = lora_rank
        c.lora_alpha = lora_alpha
        c.max_len = max_len
        c.max_cache_depth = max_cache_depth
        c.isa = _resolve(isa)
        quants = {
            "bf16": KT_QUANT_BF16, "int8": KT_QUANT_INT8, "fp8": KT_QUANT_FP8,
            "int4": KT_QUANT_INT4,
        }
        if quant not in quants:
            raise ValueError(f"quant must be one of {sorted(quants)}, got {quant!r}")
        c.quant = <kt_quant>quants[quant]
        c.group_size = group_size
        self.pool = pool
        cdef kt_status st = kt_moe_create(&c, pool.ptr, &self.ptr, &err)
        if st != KT_OK:
            _raise(st, &err)

    def __dealloc__(self):
        if self.ptr is not NULL:
            kt_moe_destroy(self.ptr)
            self.ptr = NULL

    def load_weights(self, uintptr_t gate, uintptr_t up, uintptr_t down):
        cdef kt_error err
        cdef kt_status st
        with nogil:
            st = kt_moe_load_weights(self.ptr, <const uint16_t *>gate, <const uint16_t *>up,
                                     <const uint16_t *>down, &err)
        if st != KT_OK:
            _raise(st, &err)

    def load_experts(self, int32_t first, int32_t count, str dtype, uintptr_t gate,
                     uintptr_t up, uintptr_t down, uintptr_t gate_scale=0, uintptr_t up_scale=0,
                     uintptr_t down_scale=0):
        """Packs experts [first, first + count) from bf16, int8 (+ per-row scales), fp8
        (+ block scales) or int4 (+ group scales) arrays; dtype is "bf16", "int8", "fp8" or
        "int4"."""
        cdef kt_expert_weights w
        cdef kt_error err
        cdef kt_status st
        w.dtype = _weight_dtype(dtype)
        w.gate_proj = <const void *>gate
        w.up_proj = <const void *>up
        w.down_proj = <const void *>down
        w.gate_scale = <const float *>gate_scale
        w.up_scale = <const float *>up_scale
        w.down_scale = <const float *>down_scale
        with nogil:
            st = kt_moe_load_experts(self.ptr, first, count, &w, &err)
        if st != KT_OK:
            _raise(st, &err)

    def set_profiling(self, bint on):
        """Switches the engine's phase timers on (zeroing them) or off."""
        with nogil:
            kt_moe_set_profiling(self.ptr, on)

    def phase_times(self):
        """{phase name: (seconds, runs)} since profiling was switched on."""
        cdef double seconds[KT_PHASE_COUNT]
        cdef int64_t runs[KT_PHASE_COUNT]
        cdef int i
        with nogil:
            kt_moe_phase_times(self.ptr, seconds, runs)
        times = {}
        for i in range(KT_PHASE_COUNT):
            times[kt_phase_name(<kt_phase>i).decode()] = (seconds[i], runs[i])
        return times

    def read_experts(self, int32_t first, int32_t count, uintptr_t gate, uintptr_t up,
                     uintptr_t down, uintptr_t gate_scale=0, uintptr_t up_scale=0,
                     uintptr_t down_scale=0):
        """Reads experts [first, first + count) back from the packed copy."""
        cdef kt_expert_buffers b
        cdef kt_error err
        cdef kt_status st
        b.gate_proj = <void *>gate
        b.up_proj = <void *>up
        b.down_proj = <void *>down
        b.gate_scale = <float *>gate_scale
        b.up_scale = <float *>up_scale
        b.down_scale = <float *>down_scale
        with nogil:
            st = kt_moe_read_experts(self.ptr, first, count, &b, &err)
        if st != KT_OK:
            _raise(st, &err)

    def forward(self, int64_t num_tokens, int32_t k, uintptr_t expert_ids, uintptr_t weights,
                uintptr_t x, uintptr_t out, bint out_bf16, tuple lora, bint save_for_backward,
                bint handle=False):
        """Runs one forward. With save_for_backward and handle, returns a SavedState instead of
        pushing onto the engine's stack."""
        cdef kt_forward_args a
        cdef kt_error err
        cdef kt_status st
        cdef kt_saved *saved = NULL
        a.num_tokens = num_tokens
        a.k = k
        a.expert_ids = <const int64_t *>expert_ids
        a.weights = <const float *>weights
        a.input = <const uint16_t *>x
        a.output = <void *>out
        a.output_dtype = KT_DTYPE_BF16 if out_bf16 else KT_DTYPE_F32
        a.lora = _lora(lora)
        a.save_for_backward = save_for_backward
        a.saved_out = &saved if handle else NULL
        with nogil:
            st = kt_moe_forward(self.ptr, &a, &err)
        if st != KT_OK:
            _raise(st, &err)
        if saved is NULL:
            return None
        cdef SavedState state = SavedState.__new__(SavedState)
        state.ptr = saved
        state.engine = self
        return state

    def backward(self, int64_t num_tokens, uintptr_t grad_output, bint grad_output_f32,
                 uintptr_t grad_input, tuple grads, uintptr_t grad_weights, bint accumulate,
                 bint grads_zeroed, tuple lora, SavedState saved=None):
        """Runs one backward on ``saved``, or on the newest state of the stack (popped).
        ``grads_zeroed``: the six gradient buffers hold zeros (experts without tokens are left
        untouched)."""
        if saved is not None and saved.ptr is NULL:
            raise ValueError("saved: this saved state was released")
        cdef kt_backward_args a
        cdef kt_error err
        cdef kt_status st
        a.num_tokens = num_tokens
        a.grad_output = <const void *>grad_output
        a.grad_output_dtype = KT_DTYPE_F32 if grad_output_f32 else KT_DTYPE_BF16
        a.grad_input = <uint16_t *>grad_input
        a.grads.gate_a = <uint16_t *><uintptr_t>grads[0]
        a.grads.gate_b = <uint16_t *><uintptr_t>grads[1]
        a.grads.up_a = <uint16_t *><uintptr_t>grads[2]
        a.grads.up_b = <uint16_t *><uintptr_t>grads[3]
        a.grads.down_a = <uint16_t *><uintptr_t>grads[4]
        a.grads.down_b = <uint16_t *><uintptr_t>grads[5]
        a.grad_weights = <float *>grad_weights
        a.accumulate = accumulate
        a.grads_zeroed = grads_zeroed
        a.lora = _lora(lora)
        a.saved = saved.ptr if saved is not None else NULL
        with nogil:
            st = kt_moe_backward(self.ptr, &a, &err)
        if st != KT_OK:
            _raise(st, &err)

    def cache_clear(self):
        kt_moe_cache_clear(self.ptr)

    @property
    def cache_depth(self):
        return kt_moe_cache_depth(self.ptr)

    @property
    def cache_top_tokens(self):
        return kt_moe_cache_top_tokens(self.ptr)

    @property
    def weights_loaded(self):
        return bool(kt_moe_weights_loaded(self.ptr))

    @property
    def experts_loaded(self):
        return kt_moe_experts_loaded(self.ptr)

    @property
    def packed_bytes(self):
        return kt_moe_packed_bytes(self.ptr)

    @property
    def isa(self):
        return kt_isa_name(kt_moe_isa(self.ptr)).decode()

    @property
    def kernel_variant(self):
        return kt_moe_kernel_variant(self.ptr).decode()
