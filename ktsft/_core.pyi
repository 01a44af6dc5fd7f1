"""Type stubs of the compiled module ktsft._core."""

class ISAUnavailableError(ValueError): ...
class EngineStateError(ValueError, RuntimeError): ...

def resolve_isa(name: str) -> str: ...
def isa_lists() -> tuple[list[str], list[str], str]: ...
def cpu_features() -> list[str]: ...
def vec_act(kind: str, isa: str, x: int, y: int, n: int) -> None: ...

class Pool:
    def __init__(self, num_threads: int) -> None: ...
    @property
    def num_threads(self) -> int: ...

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
    ) -> None: ...
    def load_weights(self, gate: int, up: int, down: int) -> None: ...
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
    ) -> None: ...
    def backward(
        self,
        num_tokens: int,
        grad_output: int,
        grad_output_f32: bool,
        grad_input: int,
        grads: tuple[int, ...],
        grad_weights: int,
        accumulate: bool,
        lora: tuple[int, ...],
    ) -> None: ...
    def cache_clear(self) -> None: ...
    @property
    def cache_depth(self) -> int: ...
    @property
    def cache_top_tokens(self) -> int: ...
    @property
    def weights_loaded(self) -> bool: ...
    @property
    def packed_bytes(self) -> int: ...
    @property
    def isa(self) -> str: ...
