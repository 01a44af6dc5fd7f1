"""Tests of the NumPy float64 reference (ktsft.reference) against independent checks."""

import numpy as np
import pytest

from ktsft import reference
from ktsft.gradients import BASE_NAMES, LORA_NAMES

T, K, E, H, I, R = 3, 2, 4, 5, 6, 2
ALPHA = 3.0
# Token 0: one route and one padding; token 1: expert 2 twice; token 2: two experts.
# Expert 3 gets no route at all.
IDS = np.array([[1, -1], [2, 2], [0, 1]], dtype=np.int64)


def make_params(rng, e=E, h=H, i=I, r=R, dtype=np.float64):
    """Random base and LoRA tensors (LoRA B nonzero so every gradient path is exercised)."""
    shapes = {
        "gate_proj": (e, i, h),
        "up_proj": (e, i, h),
        "down_proj": (e, h, i),
        "gate_lora_a": (e, r, h),
        "gate_lora_b": (e, i, r),
        "up_lora_a": (e, r, h),
        "up_lora_b": (e, i, r),
        "down_lora_a": (e, r, i),
        "down_lora_b": (e, h, r),
    }
    return {n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype) for n, s in shapes.items()}


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = make_params(rng)
    x = rng.standard_normal((T, H))
    w = rng.uniform(0.2, 1.0, (T, K))
    G = rng.standard_normal((T, H))
    return x, w, params, G


def naive_forward(x, ids, w, p, alpha):
    """Per-route loop straight from spec section 3, independent of the reference."""
    s = alpha / p["gate_lora_a"].shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e == -1:
                continue
            xt = x[t]
            g = p["gate_proj"][e] @ xt + s * p["gate_lora_b"][e] @ (p["gate_lora_a"][e] @ xt)
            u = p["up_proj"][e] @ xt + s * p["up_lora_b"][e] @ (p["up_lora_a"][e] @ xt)
            h = g / (1.0 + np.exp(-g)) * u
            y = p["down_proj"][e] @ h + s * p["down_lora_b"][e] @ (p["down_lora_a"][e] @ h)
            out[t] += w[t, j] * y
    return out


def test_forward_matches_naive_loop():
    x, w, p, _ = make_problem()
    out = reference.forward(x, IDS, w, lora_alpha=ALPHA, **p)
    assert out.dtype == np.float64 and out.shape == (T, H)
    np.testing.assert_allclose(out, naive_forward(x, IDS, w, p, ALPHA), rtol=1e-12, atol=1e-12)


def test_forward_matches_naive_loop_larger_random_routing():
    rng = np.random.default_rng(7)
    t, k, e, h, i, r = 17, 3, 5, 9, 7, 3
    p = make_params(rng, e, h, i, r)
    x = rng.standard_normal((t, h))
    ids = rng.integers(-1, e, (t, k))
    w = rng.standard_normal((t, k))
    out = reference.forward(x, ids, w, lora_alpha=5.0, **p)
    np.testing.assert_allclose(out, naive_forward(x, ids, w, p, 5.0), rtol=1e-12, atol=1e-12)


def check_fd(name, value, analytic, loss, eps=1e-6, rtol=1e-6):
    """Central finite differences of loss() over every element of value (perturbed in place)."""
    fd = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
        old = value[idx]
        value[idx] = old + eps
        lp = loss()
        value[idx] = old - eps
        lm = loss()
        value[idx] = old
        fd[idx] = (lp - lm) / (2 * eps)
    scale = max(np.abs(fd).max(), 1e-3)
    assert np.abs(analytic).max() > 0, name
    np.testing.assert_allclose(analytic, fd, rtol=rtol, atol=rtol * scale, err_msg=name)


def test_backward_matches_finite_differences():
    x, w, p, G = make_problem(seed=1)

    def loss():
        return float(np.sum(reference.forward(x, IDS, w, lora_alpha=ALPHA, **p) * G))

    g = reference.backward(G, x, IDS, w, lora_alpha=ALPHA, **p)
    check_fd("input", x, g.input, loss)
    check_fd("weights", w, g.weights, loss)
    for name in LORA_NAMES:
        check_fd(name, p[name], getattr(g, name), loss)
    # Expert 3 has no route: exactly zero LoRA gradients; shapes and dtypes as promised.
    for name in LORA_NAMES:
        grad = getattr(g, name)
        assert grad.shape == p[name].shape and grad.dtype == np.float64
        assert np.all(grad[3] == 0), name
    assert g.input.shape == (T, H) and g.weights.shape == (T, K)


def test_grad_weights_is_route_output_dot_grad():
    x, w, p, G = make_problem(seed=2)
    g = reference.backward(G, x, IDS, w, lora_alpha=ALPHA, **p)
    for t in range(T):
        for j in range(K):
            if IDS[t, j] == -1:
                continue
            one = np.zeros((1, K))
            one[0, j] = 1.0
            y = reference.forward(x[t : t + 1], IDS[t : t + 1], one, lora_alpha=ALPHA, **p)[0]
            assert g.weights[t, j] == pytest.approx(G[t] @ y, rel=1e-12, abs=1e-12)


def test_padding_routes():
    x, w, p, G = make_problem(seed=3)
    ids = np.array([[1, -1], [-1, -1], [3, 0]])
    out = reference.forward(x, ids, w, lora_alpha=ALPHA, **p)
    assert np.all(out[1] == 0.0)
    g = reference.backward(G, x, ids, w, lora_alpha=ALPHA, **p)
    assert np.all(g.weights[ids == -1] == 0.0)
    assert np.all(g.weights[ids != -1] != 0.0)
    assert np.all(g.input[1] == 0.0)
    # A padding route's weight does not matter.
    w2 = w.copy()
    w2[ids == -1] = 123.0
    np.testing.assert_array_equal(reference.forward(x, ids, w2, lora_alpha=ALPHA, **p), out)
    # All routes padding: everything is zero.
    none = np.full((T, K), -1)
    assert np.all(reference.forward(x, none, w, lora_alpha=ALPHA, **p) == 0.0)
    g0 = reference.backward(G, x, none, w, lora_alpha=ALPHA, **p)
    for name in ("input", "weights", *LORA_NAMES):
        assert np.all(getattr(g0, name) == 0.0), name


def test_duplicate_expert_is_two_routes():
    x, w, p, G = make_problem(seed=4)
    ids = np.array([[2, 2]] * T)
    both = reference.forward(x, ids, w, lora_alpha=ALPHA, **p)
    single = reference.forward(x, ids[:, :1], w.sum(axis=1, keepdims=True), lora_alpha=ALPHA, **p)
    np.testing.assert_allclose(both, single, rtol=1e-12, atol=1e-12)
    g = reference.backward(G, x, ids, w, lora_alpha=ALPHA, **p)
    np.testing.assert_allclose(g.weights[:, 0], g.weights[:, 1], rtol=1e-12)


def bf16_problem(seed=5):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(seed)
    p = {n: v.astype(ml_dtypes.bfloat16) for n, v in make_params(rng).items()}
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    go = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    w = rng.uniform(0.2, 1.0, (T, K)).astype(np.float32)
    return x, w, p, go


def run_both(x, ids, w, p, go):
    out = reference.forward(x, ids, w, lora_alpha=ALPHA, **p)
    g = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **p)
    return out, g


def assert_same(a, b):
    (out_a, g_a), (out_b, g_b) = a, b
    assert out_a.dtype == out_b.dtype == np.float64
    np.testing.assert_array_equal(out_a, out_b)
    for name in ("input", "weights", *LORA_NAMES):
        ga, gb = getattr(g_a, name), getattr(g_b, name)
        assert isinstance(gb, np.ndarray) and gb.dtype == np.float64, name
        np.testing.assert_array_equal(ga, gb, err_msg=name)


def test_input_forms_give_identical_results():
    x, w, p, go = bf16_problem()
    f64 = {n: v.astype(np.float64) for n, v in p.items()}
    want = run_both(x.astype(np.float64), IDS, w.astype(np.float64), f64, go.astype(np.float64))
    # ml_dtypes.bfloat16 arrays
    assert_same(want, run_both(x, IDS, w, p, go))
    # raw bf16 bits in uint16
    bits = {n: v.view(np.uint16) for n, v in p.items()}
    assert_same(want, run_both(x.view(np.uint16), IDS, w, bits, go.view(np.uint16)))
    # int32 expert ids
    assert_same(want, run_both(x, IDS.astype(np.int32), w, p, go))


def test_torch_bf16_input_gives_identical_results():
    torch = pytest.importorskip("torch")
    x, w, p, go = bf16_problem()
    f64 = {n: v.astype(np.float64) for n, v in p.items()}
    want = run_both(x.astype(np.float64), IDS, w.astype(np.float64), f64, go.astype(np.float64))

    def tbf16(a, requires_grad=False):
        t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return t.requires_grad_(requires_grad)

    tp = {n: tbf16(v, requires_grad=n in LORA_NAMES) for n, v in p.items()}
    assert all(not tp[n].requires_grad for n in BASE_NAMES)
    got = run_both(
        tbf16(x, True), torch.from_numpy(IDS), torch.from_numpy(w).requires_grad_(), tp, tbf16(go)
    )
    assert_same(want, got)


def test_uint16_bits_are_decoded_as_bf16():
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x8000, 0x4049, 0x7F80], dtype=np.uint16)
    want = [1.0, -2.0, 0.0, -0.0, 3.140625, np.inf]
    np.testing.assert_array_equal(reference._as_f64(bits), want)
    assert reference._as_f64(bits).dtype == np.float64


@pytest.mark.parametrize("bad", [E, E + 3, -2])
def test_out_of_range_expert_id_raises(bad):
    x, w, p, G = make_problem()
    ids = IDS.copy()
    ids[2, 1] = bad
    with pytest.raises(ValueError, match="expert_ids"):
        reference.forward(x, ids, w, lora_alpha=ALPHA, **p)
    with pytest.raises(ValueError, match="expert_ids"):
        reference.backward(G, x, ids, w, lora_alpha=ALPHA, **p)


def test_extreme_preactivations_stay_finite():
    x, w, p, G = make_problem(seed=6)
    out = reference.forward(x * 1e4, IDS, w, lora_alpha=ALPHA, **p)
    g = reference.backward(G, x * 1e4, IDS, w, lora_alpha=ALPHA, **p)
    assert np.all(np.isfinite(out))
    for name in ("input", "weights", *LORA_NAMES):
        assert np.all(np.isfinite(getattr(g, name))), name
