"""ktsft.ThreadPool (spec section 6, Threads) and MoESFT's submit_forward / submit_backward."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import Future

import ml_dtypes
import numpy as np
import pytest

import ktsft
from ktsft import reference
from ktsft.gradients import LORA_NAMES
from ktsft.pool import default_num_threads

BF16 = np.dtype(ml_dtypes.bfloat16)
E, K, H, I, R, ALPHA = 8, 3, 96, 80, 4, 8.0  # noqa: E741
FWD_TOL, BWD_TOL = 0.01, 0.02  # spec section 4, bf16
GRAD_NAMES = ("input", *LORA_NAMES, "weights")


def _bf16(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).astype(BF16)


def _params(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: _bf16(rng.standard_normal(s) / np.sqrt(s[-1])) for n, s in cfg.shapes().items()}


def _batch(seed, t):
    rng = np.random.default_rng(seed)
    x = _bf16(rng.standard_normal((t, H)))
    ids = rng.integers(-1, E, (t, K)).astype(np.int64)
    w = rng.uniform(0.1, 1.0, (t, K)).astype(np.float32)
    go = _bf16(rng.standard_normal((t, H)))
    return x, ids, w, go


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours).astype(np.float64), np.asarray(ref).astype(np.float64)
    return float(np.mean(np.abs(ours - ref)) / (np.mean(np.abs(ref)) + 1e-30))


def _same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def pool():
    return ktsft.ThreadPool(2)


# ---- the pool itself ----------------------------------------------------------------------------


def test_submit_returns_a_future_at_once(pool):
    gate = threading.Event()
    t0 = time.perf_counter()
    fut = pool.submit(lambda: gate.wait(10) and "done")
    assert isinstance(fut, Future)
    assert time.perf_counter() - t0 < 1.0
    assert not fut.done()
    later = pool.submit(lambda: "second")
    assert not later.done()  # queued behind the blocked task
    gate.set()
    assert fut.result(timeout=10) == "done"
    assert later.result(timeout=10) == "second"
    pool.sync()


def test_tasks_run_in_submission_order(pool):
    seen = []

    def task(i):
        def run():
            time.sleep(0.002 if i % 3 == 0 else 0.0)  # earlier tasks slower: order still holds
            seen.append((i, threading.get_ident()))
            return i

        return run

    futures = [pool.submit(task(i)) for i in range(40)]
    pool.sync()
    assert [i for i, _ in seen] == list(range(40))
    assert [f.result() for f in futures] == list(range(40))
    assert all(f.done() for f in futures)


def test_sync_waits_for_everything(pool):
    done = []
    for i in range(5):
        pool.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
    pool.sync()
    assert done == list(range(5))


def test_sync_reraises_the_first_error_and_the_pool_keeps_working(pool):
    ran = []

    def fail(exc):
        def run():
            ran.append(type(exc).__name__)
            raise exc

        return run

    pool.submit(lambda: ran.append("ok"))
    pool.submit(fail(ValueError("first failure")))
    pool.submit(lambda: ran.append("after"))
    pool.submit(fail(KeyError("second failure")))
    with pytest.raises(ValueError, match="first failure"):
        pool.sync()
    # every task ran, the failing ones did not stop the queue
    assert ran == ["ok", "ValueError", "after", "KeyError"]
    pool.sync()  # reported once: nothing pending now
    assert pool.submit(lambda: 41 + 1).result(timeout=10) == 42
    pool.sync()


def test_error_of_a_task_whose_result_was_collected_is_still_reported_by_sync(pool):
    fut = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(timeout=10)
    with pytest.raises(ZeroDivisionError):
        pool.sync()
    pool.sync()


def test_run_returns_the_result_in_order(pool):
    seen = []
    pool.submit(lambda: (time.sleep(0.01), seen.append("queued")))
    assert pool.run(lambda: seen.append("run") or "value") == "value"
    assert seen == ["queued", "run"]

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pool.run(boom)
    pool.sync()  # an error raised by run() is not raised a second time


def test_run_on_an_idle_pool_runs_on_the_calling_thread(pool):
    pool.sync()
    assert pool.run(threading.get_ident) == threading.get_ident()
    gate = threading.Event()
    queued = pool.submit(lambda: gate.wait(10))
    caller = []
    t = threading.Thread(target=lambda: caller.append(pool.run(threading.get_ident)))
    t.start()
    time.sleep(0.05)
    assert not caller  # queued behind the blocked task, on the dispatcher
    gate.set()
    t.join(10)
    assert queued.result(timeout=10)
    assert caller and caller[0] not in (threading.get_ident(), t.ident)
    pool.sync()


def test_task_submitted_during_a_run_on_the_calling_thread_waits_for_it(pool):
    pool.sync()
    started, spans = threading.Event(), {}

    def slow():
        started.set()
        t0 = time.perf_counter()
        time.sleep(0.1)
        spans["run"] = (t0, time.perf_counter())

    t = threading.Thread(target=pool.run, args=(slow,))
    t.start()
    assert started.wait(10)
    fut = pool.submit(lambda: spans.setdefault("submitted", (time.perf_counter(),)))
    fut.result(timeout=10)
    t.join(10)
    assert spans["submitted"][0] >= spans["run"][1]  # never both on the native threads
    pool.sync()


def test_run_after_close_raises():
    p = ktsft.ThreadPool(2)
    assert p.run(lambda: 3) == 3
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.run(lambda: 4)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_num_threads(n):
    p = ktsft.ThreadPool(n)
    assert p.num_threads == n
    assert str(n) in repr(p)
    assert p.run(lambda: "x") == "x"
    p.close()


def test_default_num_threads_is_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("KTSFT_NUM_THREADS", raising=False)
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_num_threads() == expected
    assert ktsft.ThreadPool().num_threads == expected


@pytest.mark.parametrize("value", ["3", " 5 ", "1"])
def test_default_num_threads_honours_env(monkeypatch, value):
    monkeypatch.setenv("KTSFT_NUM_THREADS", value)
    assert ktsft.ThreadPool().num_threads == int(value)
    assert ktsft.ThreadPool(2).num_threads == 2  # an explicit argument wins
    assert ktsft.runtime_info()["num_threads"] == int(value)


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5", "2 threads"])
def test_bad_env_num_threads_rejected(monkeypatch, value):
    monkeypatch.setenv("KTSFT_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"KTSFT_NUM_THREADS.*{value.strip()}"):
        ktsft.ThreadPool()
    info = ktsft.runtime_info()  # reports the problem instead of failing
    assert info["num_threads"] is None and "KTSFT_NUM_THREADS" in info["num_threads_error"]


@pytest.mark.parametrize("n", [0, -1, -(2**40)])
def test_num_threads_below_one_rejected(n):
    with pytest.raises(ValueError, match=f"num_threads.*>= 1.*{n}"):
        ktsft.ThreadPool(n)


@pytest.mark.parametrize("n", [2.0, "2", True, np.float64(2)])
def test_num_threads_non_int_rejected(n):
    with pytest.raises(TypeError, match=f"num_threads.*int.*{type(n).__name__}"):
        ktsft.ThreadPool(n)


def test_spin_default_and_env(monkeypatch):
    monkeypatch.delenv("KTSFT_SPIN_US", raising=False)
    assert ktsft.ThreadPool(2).spin_us == 100.0
    monkeypatch.setenv("KTSFT_SPIN_US", " 2.5 ")
    assert ktsft.ThreadPool(2).spin_us == 2.5
    assert ktsft.ThreadPool(2, spin_us=0).spin_us == 0.0  # an explicit argument wins


@pytest.mark.parametrize("value", ["-1", "abc", "1e7", "nan"])
def test_bad_env_spin_rejected(monkeypatch, value):
    monkeypatch.setenv("KTSFT_SPIN_US", value)
    with pytest.raises(ValueError, match=f"KTSFT_SPIN_US.*{value}"):
        ktsft.ThreadPool(2)


@pytest.mark.parametrize(
    "value, error",
    [
        (-1, ValueError),
        (2e6, ValueError),
        ("5", TypeError),
        (True, TypeError),
        (float("nan"), ValueError),
    ],
)
def test_bad_spin_rejected(value, error):
    with pytest.raises(error, match="spin_us"):
        ktsft.ThreadPool(2, spin_us=value)
    p = ktsft.ThreadPool(2)
    with pytest.raises(error, match="spin_us"):
        p.spin_us = value
    assert p.spin_us == 100.0  # unchanged


@pytest.mark.parametrize("n", [2, 3])
def test_results_bit_identical_whether_threads_spin_or_sleep(n):
    """Many short calls back to back: with spin_us=0 every wait sleeps on a condition variable,
    with a long spin none does; a lost wake-up would hang, a missed result would differ."""
    results = []
    for spin in (0, 1e5, 0):
        with ktsft.ThreadPool(n, spin_us=spin) as p:
            moe, _ = _layer(p)
            got = []
            for step in range(30):
                x, ids, w, go = _batch(50 + step, 1 + step % 5)
                out = moe.forward(x, ids, w, save_for_backward=True)
                got.append((out, moe.backward(go)))
            results.append(got)
            del moe
    for other in results[1:]:
        for (out0, g0), (out, g) in zip(results[0], other):
            assert _same_bits(out, out0)
            for name in GRAD_NAMES:
                assert _same_bits(getattr(g, name), getattr(g0, name)), name


def test_workers_sleep_between_calls():
    """The workers spin only between the phases of a call: after it returns, a pool allowed to
    spin for a second takes (nearly) no CPU time while the caller sleeps."""
    with ktsft.ThreadPool(3, spin_us=1e6) as p:
        moe, _ = _layer(p)
        x, ids, w, go = _batch(61, 3)
        moe.forward(x, ids, w, save_for_backward=True)
        moe.backward(go)
        cpu0 = time.process_time()
        time.sleep(0.3)
        busy = time.process_time() - cpu0
        del moe
    assert busy < 0.1  # two spinning workers would take about 0.6 s


def test_spinning_workers_stop_promptly():
    """Closing a pool right after a call returns at once: its workers do not wait out a spin of
    up to a second."""
    p = ktsft.ThreadPool(3, spin_us=1e6)
    moe, _ = _layer(p)
    x, ids, w, _ = _batch(60, 3)
    moe.forward(x, ids, w)
    del moe
    p.close()
    assert sys.getrefcount(p) == 2  # this name and the argument: del p destroys the threads
    t0 = time.perf_counter()
    del p
    assert time.perf_counter() - t0 < 0.5


def test_context_manager_closes():
    with ktsft.ThreadPool(1) as p:
        fut = p.submit(lambda: time.sleep(0.01) or 5)
    assert fut.done() and fut.result() == 5


# ---- MoESFT futures -----------------------------------------------------------------------------


def _layer(pool, depth=1, max_len=32, seed=0):
    cfg = ktsft.MoESFTConfig(
        E, K, H, I, lora_rank=R, lora_alpha=ALPHA, max_len=max_len, max_cache_depth=depth
    )
    params = _params(cfg, seed)
    return ktsft.MoESFT(cfg, pool=pool, **params), params


def test_submit_forward_backward_equal_forward_backward(pool):
    moe, params = _layer(pool)
    x, ids, w, go = _batch(1, 9)
    out = moe.forward(x, ids, w, save_for_backward=True)
    g = moe.backward(go)

    f = moe.submit_forward(x, ids, w, save_for_backward=True)
    b = moe.submit_backward(go)
    assert isinstance(f, Future) and isinstance(b, Future)
    out2, g2 = f.result(timeout=30), b.result(timeout=30)
    pool.sync()
    assert _same_bits(out, out2)
    for name in GRAD_NAMES:
        assert _same_bits(getattr(g, name), getattr(g2, name)), name
    ref = reference.forward(x, ids, w, lora_alpha=ALPHA, **params)
    assert _rel_err(out2, ref) < FWD_TOL
    rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
    for name in GRAD_NAMES:
        assert _rel_err(getattr(g2, name), getattr(rg, name)) < BWD_TOL, name


def test_submit_forward_with_out_buffer_returns_it(pool):
    moe, params = _layer(pool)
    x, ids, w, _ = _batch(2, 4)
    out = np.full((4, H), np.nan, np.float32)
    fut = moe.submit_forward(x, ids, w, out=out)
    assert fut.result(timeout=30) is out
    assert _rel_err(out, reference.forward(x, ids, w, lora_alpha=ALPHA, **params)) < FWD_TOL


def test_submit_checks_arguments_at_once(pool):
    moe, _ = _layer(pool)
    x, ids, w, _ = _batch(3, 4)
    with pytest.raises(TypeError, match="x.*bfloat16.*float32"):
        moe.submit_forward(x.astype(np.float32), ids, w)
    with pytest.raises(TypeError, match="grad_output.*float64"):
        moe.submit_backward(np.zeros((4, H)))
    pool.sync()  # nothing was queued


def test_failing_future_then_pool_keeps_working(pool):
    moe, params = _layer(pool)
    x, ids, w, go = _batch(4, 6)
    bad = ids.copy()
    bad[5, 2] = E
    f_bad = moe.submit_forward(x, bad, w, save_for_backward=True)
    f_ok = moe.submit_forward(x, ids, w, save_for_backward=True)
    b_ok = moe.submit_backward(go)
    with pytest.raises(ValueError, match=r"expert_ids\[5, 2\]"):
        f_bad.result(timeout=30)
    with pytest.raises(ValueError, match=r"expert_ids\[5, 2\]"):
        pool.sync()
    out = f_ok.result(timeout=30)
    g = b_ok.result(timeout=30)
    assert moe.cache_depth == 0
    assert _rel_err(out, reference.forward(x, ids, w, lora_alpha=ALPHA, **params)) < FWD_TOL
    rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
    assert _rel_err(g.input, rg.input) < BWD_TOL


def test_failed_forward_is_not_reraised_by_sync(pool):
    moe, params = _layer(pool)
    x, ids, w, _ = _batch(5, 3)
    ids[0, 0] = -2
    with pytest.raises(ValueError, match="expert_ids"):
        moe.forward(x, ids, w)
    pool.sync()  # the blocking call already raised it


@pytest.mark.parametrize("depth", [1, 4])
def test_many_queued_forwards_and_backwards_pair_lifo(pool, depth):
    """depth forwards queued with save, then their backwards queued newest first; every
    backward pairs with its own forward (different T per forward, so a mix-up would raise)."""
    moe, params = _layer(pool, depth=depth)
    sizes = [3, 7, 1, 12, 5][:depth]
    batches = [_batch(10 + i, t) for i, t in enumerate(sizes)]
    fwd = [moe.submit_forward(x, ids, w, save_for_backward=True) for x, ids, w, _ in batches]
    bwd = [moe.submit_backward(b[3]) for b in reversed(batches)]
    pool.sync()
    assert moe.cache_depth == 0
    for (x, ids, w, go), f, b in zip(batches, fwd, reversed(bwd)):
        ref = reference.forward(x, ids, w, lora_alpha=ALPHA, **params)
        assert _rel_err(f.result(), ref) < FWD_TOL
        g, rg = b.result(), reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
        assert g.input.shape == (x.shape[0], H)
        for name in GRAD_NAMES:
            assert _rel_err(getattr(g, name), getattr(rg, name)) < BWD_TOL, name


def test_interleaved_queue_pairs_correctly(pool):
    """f0 f1 b1 f2 f3 b3 b2 b0 with max_cache_depth = 3, all queued before any result is read;
    the caller overwrites x after submitting (the saved state must not alias it)."""
    moe, params = _layer(pool, depth=3)
    batches = [_batch(20 + i, t) for i, t in enumerate([2, 6, 4, 9])]
    orig = [tuple(a.copy() for a in b) for b in batches]
    plan = ["f0", "f1", "b1", "f2", "f3", "b3", "b2", "b0"]
    futs = {}
    for step in plan:
        i = int(step[1])
        x, ids, w, go = batches[i]
        if step[0] == "f":
            futs[step] = moe.submit_forward(x, ids, w, save_for_backward=True)
        else:
            futs[step] = moe.submit_backward(go)
    futs["f3"].result(timeout=30)
    for x, *_ in batches:
        x[...] = 0  # overwritten after the forwards ran; backwards b3, b2, b0 may still be queued
    pool.sync()
    assert moe.cache_depth == 0
    for i, (x, ids, w, go) in enumerate(orig):
        ref = reference.forward(x, ids, w, lora_alpha=ALPHA, **params)
        assert _rel_err(futs[f"f{i}"].result(), ref) < FWD_TOL
        rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
        g = futs[f"b{i}"].result()
        for name in GRAD_NAMES:
            assert _rel_err(getattr(g, name), getattr(rg, name)) < BWD_TOL, (i, name)


def test_two_layers_share_one_pool(pool):
    a, pa = _layer(pool, seed=1)
    b, pb = _layer(pool, seed=2)
    x, ids, w, go = _batch(30, 5)
    fa = a.submit_forward(x, ids, w, save_for_backward=True)
    fb = b.submit_forward(x, ids, w, save_for_backward=True)
    gb = b.submit_backward(go)
    ga = a.submit_backward(go)
    pool.sync()
    for f, g, p in ((fa, ga, pa), (fb, gb, pb)):
        assert _rel_err(f.result(), reference.forward(x, ids, w, lora_alpha=ALPHA, **p)) < FWD_TOL
        rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **p)
        assert _rel_err(g.result().gate_lora_a, rg.gate_lora_a) < BWD_TOL


def test_results_do_not_depend_on_thread_count():
    outs = []
    for n in (1, 2, 3, 5):
        with ktsft.ThreadPool(n) as p:
            moe, _ = _layer(p)
            x, ids, w, go = _batch(40, 17)
            out = moe.forward(x, ids, w, save_for_backward=True)
            outs.append((out, moe.backward(go)))
            del moe
    out0, g0 = outs[0]
    for out, g in outs[1:]:
        assert _rel_err(out, out0) < 1e-5  # fp32 summation order at most
        for name in GRAD_NAMES:
            assert _rel_err(getattr(g, name), getattr(g0, name)) < 1e-2, name
