"""Type stubs of the compiled module ktsft._core."""

class ISAUnavailableError(ValueError): ...
class EngineStateError(ValueError, RuntimeError): ...

def resolve_isa(name: str) -> str: ...
def isa_lists() -> tuple[list[str], list[str], str]: ...
def cpu_features() -> list[str]: ...
def isa_variant(name: str) -> str: ...
def kernels_testing_set(feature_mask: int, emulate_bf16: bool) -> None: ...
def vec_act(kind: str, isa: str, x: int, y: int, n: int) -> None: ...
def gemm_test(
    isa: str,
    op: str,
    a: int,
    a_scale: int,
    m: int,
    w: int,
    w_scale: int,
    rows: int,
    cols: int,
    w_int8: bool,
    n0: int,
    n: int,
    c: int,
) -> None: ...
def amx_status() -> str: ...

class AMXFault(RuntimeError): ...

def amx_emu_ldtilecfg(cfg: int) -> None: ...
def amx_emu_sttilecfg(cfg: int) -> None: ...
def amx_emu_tilerelease() -> None: ...
def amx_emu_tileloadd(tile: int, base: int, stride: int) -> None: ...
def amx_emu_tilestored(tile: int, base: int, stride: int) -> None: ...
def amx_emu_tilezero(tile: int) -> None: ...
def amx_emu_dp(op: str, dst: int, a: int, b: int) -> None: ...
def amx_emu_first_fault() -> str | None: ...
def amx_emu_clear_faults() -> None: ...

class Pool:
    def __init__(self, num_threads: int) -> None: ...
    @property
    def num_threads(self) -> int: ...

class SavedState:
    @property
    def engine(self) -> Engine: ...
    @property
    def released(self) -> bool: ...
    @property
    def num_tokens(self) -> int: ...
    def release(self) -> None: ...

class Engine:
    def __init__(
        self,
        pool: Pool,
        expert_num: int,
        num_experts_per_tok: int,
        hidden_size: int,
        intermediate_size: int,
        lora_rank: int,
        lora_alpha: float,
        max_len: int,
        max_cache_depth: int,
        isa: str,
        quant: str = "bf16",
    ) -> None: ...
    def load_weights(self, gate: int, up: int, down: int) -> None: ...
    def load_experts(
        self,
        first: int,
        count: int,
        int8: bool,
        gate: int,
        up: int,
        down: int,
        gate_scale: int = 0,
        up_scale: int = 0,
        down_scale: int = 0,
    ) -> None: ...
    def read_experts(
        self,
        first: int,
        count: int,
        gate: int,
        up: int,
        down: int,
        gate_scale: int = 0,
        up_scale: int = 0,
        down_scale: int = 0,
    ) -> None: ...
    def forward(
        self,
        num_tokens: int,
        k: int,
        expert_ids: int,
        weights: int,
        x: int,
        out: int,
        out_bf16: bool,
        lora: tuple[int, ...],
        save_for_backward: bool,
        handle: bool = False,
    ) -> SavedState | None: ...
    def backward(
        self,
        num_tokens: int,
        grad_output: int,
        grad_output_f32: bool,
        grad_input: int,
        grads: tuple[int, ...],
        grad_weights: int,
        accumulate: bool,
        grads_zeroed: bool,
        lora: tuple[int, ...],
        saved: SavedState | None = None,
    ) -> None: ...
    def cache_clear(self) -> None: ...
    @property
    def cache_depth(self) -> int: ...
    @property
    def cache_top_tokens(self) -> int: ...
    @property
    def weights_loaded(self) -> bool: ...
    @property
    def experts_loaded(self) -> int: ...
    @property
    def packed_bytes(self) -> int: ...
    @property
    def isa(self) -> str: ...
    @property
    def kernel_variant(self) -> str: ...
