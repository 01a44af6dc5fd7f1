"""MoELoRA under torch.nn.parallel.DistributedDataParallel with the gloo backend.

Two processes on localhost each take half of a batch; DDP averages their gradients. They must
equal (to the spec's backward goal: bf16 gradients are rounded before the all-reduce) the
gradients of one process on the whole batch, over two optimizer steps. This file is also the
worker script: ``python test_distributed.py RANK WORLD INIT_METHOD DATA OUT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

LORA_NAMES = (
    "gate_lora_a",
    "gate_lora_b",
    "up_lora_a",
    "up_lora_b",
    "down_lora_a",
    "down_lora_b",
)
STEPS = 2
LR = 0.05


def train(layer, data: dict, rows: slice, model=None) -> list:
    """STEPS SGD steps on the batch rows; returns the LoRA grads of every step."""
    model = model if model is not None else layer
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    x, ids, w, go = (data[n][rows] for n in ("x", "ids", "w", "go"))
    history = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = model(x, ids, w)
        loss = (out * go).sum() / x.shape[0]  # mean over this process's tokens
        loss.backward()
        history.append({n: getattr(layer, n).grad.clone() for n in LORA_NAMES})
        opt.step()
    return history


def build(data: dict, pool, copy_lora: bool = True):
    from ktsft.torch import MoELoRA

    layer = MoELoRA(
        data["gate_proj"],
        data["up_proj"],
        data["down_proj"],
        lora_rank=data["gate_lora_a"].shape[1],
        lora_alpha=8.0,
        num_experts_per_tok=data["ids"].shape[1],
        pool=pool,
    )
    if copy_lora:  # else PEFT init: DDP must broadcast rank 0's values
        with torch.no_grad():
            for n in LORA_NAMES:
                getattr(layer, n).copy_(data[n])
    return layer


def worker(rank: int, world: int, init_method: str, data_path: str, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import ktsft

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        data = torch.load(data_path)
        layer = build(data, ktsft.ThreadPool(1), copy_lora=rank == 0)
        ddp = DistributedDataParallel(layer)
        T = data["x"].shape[0]
        per = T // world
        history = train(layer, data, slice(rank * per, (rank + 1) * per), model=ddp)
        params = {n: getattr(layer, n).detach().clone() for n in LORA_NAMES}
        torch.save({"history": history, "params": params}, out_path)
        dist.barrier()  # neither rank tears gloo down while the other still uses it (that aborts)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path, rng):
    from conftest import BWD_TOL, assert_close, make_layer, make_routing, make_tokens

    import ktsft

    E, k, H, I, r, T = 4, 2, 32, 16, 4, 16  # noqa: E741
    p = make_layer(rng, E, H, I, r)
    ids, w = make_routing(rng, T, k, E, pad=0.1)

    def t(a):
        import numpy as np

        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    data = {n: t(a) for n, a in p.items()}
    data.update(
        x=t(make_tokens(rng, T, H)).float(),
        ids=t(ids),
        w=t(w),
        go=torch.from_numpy(rng.standard_normal((T, H)).astype("float32")),
    )
    data_path = tmp_path / "data.pt"
    torch.save(data, data_path)

    init = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(rank),
                "2",
                init,
                str(data_path),
                str(tmp_path / f"{rank}.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank]}"

    # one process, the whole batch
    single = train(build(data, ktsft.ThreadPool(1)), data, slice(0, T))
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for n in LORA_NAMES:
        assert torch.equal(results[0]["params"][n], results[1]["params"][n]), n
        for step in range(STEPS):
            g0, g1 = (res["history"][step][n] for res in results)
            assert torch.equal(g0, g1), f"step {step} {n}: ranks disagree after all-reduce"
            assert_close(g0, single[step][n], BWD_TOL, f"step {step} {n}")
    assert any(results[0]["history"][1][n].any() for n in LORA_NAMES)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
