"""External int4 formats (spec section 5.2, loading pre-quantized weights): compressed-tensors
``pack-quantized``, GGUF ``Q4_0`` and symmetric GPTQ converted to ktsft's int4 layout exactly,
against the real libraries' own packers and dequantizers (a NumPy model of GPTQ's, which no
installable library offers here), and loaded end to end with no bf16 copy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    BWD_TOL,
    FWD_TOL,
    GRAD_NAMES,
    assert_close,
    make_layer,
    make_routing,
    make_tokens,
)

import ktsft
from ktsft import int4_formats, reference
from ktsft.gradients import LORA_NAMES

torch = pytest.importorskip("torch")

BASE = ("gate_proj", "up_proj", "down_proj")
SCALES = ("gate_scale", "up_scale", "down_scale")

# rows, cols, group size: partial last groups, widths that are no multiple of 8, odd widths
CT_SHAPES = [(5, 64, 32), (3, 37, 32), (4, 129, 64), (2, 8, 32), (7, 300, 128), (3, 200, 32)]


def random_q(rng, shape):
    """Signed 4-bit values, every one of -8 .. 7 present when there is room."""
    q = rng.integers(-8, 8, shape).astype(np.int8)
    flat = q.reshape(-1)
    flat[: min(16, flat.size)] = np.arange(-8, 8)[: min(16, flat.size)]
    return q


# ---- compressed-tensors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("rows, cols, g", CT_SHAPES)
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32"])
def test_compressed_tensors_converter_matches_pack_to_int32(ct, rng, rows, cols, g, scale_dtype):
    """compressed_tensors' own pack_to_int32 / unpack_from_int32: ktsft's bytes hold exactly the
    values it packed, and the scales are widened exactly."""
    q = random_q(rng, (rows, cols))
    packed = ct.pack_to_int32(torch.from_numpy(q), 4)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (rows, -(-cols // 8))
    scale = torch.from_numpy(rng.uniform(-2, 2, (rows, -(-cols // g))).astype(np.float32))
    scale = scale.to(getattr(torch, scale_dtype))
    b, s, group = int4_formats.compressed_tensors_to_int4(
        packed, scale, torch.tensor([rows, cols]), name="w"
    )
    assert group == g and b.dtype == np.uint8 and s.dtype == np.float32
    theirs = ct.unpack_from_int32(packed, 4, torch.Size([rows, cols])).numpy()
    assert np.array_equal(reference.unpack_int4(b, cols), theirs)
    assert b.tobytes() == reference.pack_int4(q).tobytes()  # odd widths padded as ktsft pads
    assert np.array_equal(s, scale.float().numpy())


@pytest.mark.parametrize("g", [32, 64, 128])
def test_compressed_tensors_quantizer_end_to_end_dequantizes_identically(ct, rng, g):
    """Weights quantized by compressed_tensors itself (symmetric int4 groups, bf16 scales):
    ktsft's dequantized values equal compressed_tensors' dequantize in float32, exactly."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=g)
    rows, cols = 9, 2 * g
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(g)).to(torch.bfloat16)
    blocks = w.float().reshape(rows, -1, g)
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    scale = scale.to(torch.bfloat16)
    q = quantize(w, scale, zp, args, dtype=torch.int8)
    theirs = dequantize(q, scale.float(), zp, args, dtype=torch.float32).numpy()
    b, s, group = int4_formats.compressed_tensors_to_int4(
        ct.pack_to_int32(q, 4), scale, torch.tensor([rows, cols])
    )
    assert group == g
    assert np.array_equal(reference.dequantize_int4(b, s, cols, g), theirs.astype(np.float64))


def test_compressed_tensors_converter_errors(ct, rng):
    q = random_q(rng, (4, 64))
    packed = ct.pack_to_int32(torch.from_numpy(q), 4)
    scale = torch.ones(4, 2, dtype=torch.bfloat16)
    conv = int4_formats.compressed_tensors_to_int4
    with pytest.raises(
        ValueError, match=r"w_packed: expected shape \[4, 9\] for w_shape \[4, 70\]"
    ):
        conv(packed, scale, torch.tensor([4, 70]), name="w")
    with pytest.raises(ValueError, match=r"w_packed must be an int32 matrix.*got int64"):
        conv(packed.long(), scale, torch.tensor([4, 64]), name="w")
    with pytest.raises(ValueError, match=r"w_scale must have shape \[4, groups\].*got \[3, 2\]"):
        conv(packed, scale[:3], torch.tensor([4, 64]), name="w")
    with pytest.raises(ValueError, match=r"4 scale\(s\) per row of 64 columns means groups of 16"):
        conv(packed, torch.ones(4, 4), torch.tensor([4, 64]), name="w")
    with pytest.raises(ValueError, match=r"is group size 32, but group_size=64 was asked for"):
        conv(packed, scale, torch.tensor([4, 64]), group_size=64, name="w")
    with pytest.raises(ValueError, match=r"w_scale: scales must be bfloat16, float16 or float32"):
        conv(packed, torch.ones(4, 2, dtype=torch.int32), torch.tensor([4, 64]), name="w")
    with pytest.raises(ValueError, match=r"w_shape must hold 2 integers"):
        conv(packed, scale, torch.tensor([4, 64, 1]), name="w")


# ---- GGUF Q4_0 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf")


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 5, 64), (4, 256)])
def test_gguf_q4_0_converter_matches_gguf_dequantize(gguf, rng, shape):
    """gguf's own Q4_0 quantize / dequantize: ktsft's dequantized int4 equals gguf's dequantize
    exactly (negative d included: ggml divides the signed extreme by -8), and the values are
    gguf's nibbles minus 8."""
    w = rng.standard_normal(shape).astype(np.float32)
    w.reshape(-1, shape[-1])[0, :32] = 0  # an all-zero block: d = 0
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_0)
    b, s = int4_formats.gguf_q4_0_to_int4(data, shape[-1])
    assert b.shape == shape[:-1] + (shape[-1] // 2,) and s.shape == shape[:-1] + (shape[-1] // 32,)
    assert (s == 0).any() and ((s < 0).any() or s.size < 4)  # -0.0 counts as zero
    mine = reference.dequantize_int4(b, s, shape[-1], 32)
    assert np.array_equal(mine, theirs.astype(np.float64))
    blocks = data.reshape(shape[:-1] + (-1, 18))
    nib = np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], axis=-1)
    expected = (nib.astype(np.int8) - 8).reshape(shape)
    assert np.array_equal(reference.unpack_int4(b, shape[-1]), expected)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    assert np.array_equal(s, d.astype(np.float32))


def test_gguf_q4_0_converter_errors(gguf, rng):
    data = gguf.quants.quantize(
        rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0
    )
    with pytest.raises(ValueError, match=r"t: 96 columns need 54 bytes.*got 36"):
        int4_formats.gguf_q4_0_to_int4(data, 96, name="t")
    with pytest.raises(ValueError, match=r"t: Q4_0 data must be uint8.*got uint8 \[2, 35\]"):
        int4_formats.gguf_q4_0_to_int4(data[:, :35], name="t")


def write_gguf_experts(gguf, path, p, layer=3, *, down_type=None):
    """One llama.cpp MoE layer's stacked experts (ffn_*_exps) quantized to Q4_0 by gguf, as
    convert_hf_to_gguf.py writes them: numpy [E, rows, cols], GGUF shape [cols, rows, E].
    Returns the quantized bytes of each."""
    Q = gguf.GGMLQuantizationType.Q4_0
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    out = {}
    for n in BASE:
        key = int4_formats.GGUF_EXPERT_KEYS[n].format(layer=layer)
        w = p[n].astype(np.float32)
        if n == "down_proj" and down_type is not None:
            writer.add_tensor(key, w.astype(np.float16))
            continue
        out[n] = gguf.quants.quantize(w, Q)
        writer.add_tensor(key, out[n], raw_shape=out[n].shape, raw_dtype=Q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def make_problem(rng, E, H, I, r=4, T=11, k=2):  # noqa: E741
    p = make_layer(rng, E, H, I, r)
    ids, w = make_routing(rng, T, k, E, pad=0.1)
    return p, make_tokens(rng, T, H), ids, w, make_tokens(rng, T, H)


def check_against_reference(layer, deq, x, ids, w, go, quant):
    """The layer's forward and backward against the float64 model of the weights it holds
    (``deq``, used as given; ``quant`` models the activations), at the bf16 goals."""
    lora = {n: getattr(layer, n).detach() for n in LORA_NAMES}
    kw = dict(lora_alpha=layer.lora_alpha, quant=quant, base_quantized=True, **deq, **lora)
    out = layer.moe.forward(x, ids, w, save_for_backward=True)
    assert_close(out, reference.forward(x, ids, w, **kw), FWD_TOL, "forward")
    got = layer.moe.backward(go)
    ref = reference.backward(go, x, ids, w, **kw)
    for name in GRAD_NAMES:
        assert_close(getattr(got, name), getattr(ref, name), BWD_TOL, name)


def test_gguf_file_loads_into_int4_exactly_and_into_bf16_dequantized(gguf, rng, tmp_path):
    from ktsft.torch import MoELoRA

    E, H, I = 4, 96, 64  # noqa: E741
    p, x, ids, w, go = make_problem(rng, E, H, I)
    path = tmp_path / "moe.gguf"
    raw = write_gguf_experts(gguf, path, p)
    opts = dict(lora_rank=4, init_lora_weights=False, num_experts_per_tok=2)
    layer = MoELoRA.from_gguf(path, 3, quant="int4", **opts)
    assert (layer.expert_num, layer.hidden_size, layer.intermediate_size) == (E, H, I)
    assert layer.moe.config.group_size == 32
    got, deq = layer.moe.base_weights(), layer.moe.dequantized_weights()
    theirs = {}
    for n, sn in zip(BASE, SCALES):
        b, s = int4_formats.gguf_q4_0_to_int4(raw[n])
        assert got[n].tobytes() == b.tobytes() and got[sn].tobytes() == s.tobytes(), n
        theirs[n] = gguf.quants.dequantize(raw[n], gguf.GGMLQuantizationType.Q4_0)
        assert np.array_equal(deq[n], theirs[n]), n
    check_against_reference(layer, theirs, x, ids, w, go, "int4")
    plain = MoELoRA.from_gguf(path, 3, quant="bf16", lora_rank=4)
    for n in BASE:
        bf16 = torch.from_numpy(theirs[n]).to(torch.bfloat16).view(torch.uint16).numpy()
        assert np.array_equal(plain.moe.base_weights()[n].view(np.uint16), bf16), n
    with pytest.raises(ValueError, match=r"group_size=64 was asked for.*has group size 32"):
        MoELoRA.from_gguf(path, 3, quant="int4", group_size=64)
    with pytest.raises(KeyError, match=r"'blk.4.ffn_gate_exps.weight' is not in"):
        MoELoRA.from_gguf(path, 4, quant="int4")


def test_gguf_non_q4_0_experts_are_a_clear_error(gguf, rng, tmp_path):
    p = make_layer(rng, 2, 64, 32, 2)
    path = tmp_path / "f16.gguf"
    write_gguf_experts(gguf, path, p, down_type="F16")
    with pytest.raises(ValueError, match=r"blk.3.ffn_down_exps.weight .* is F16; only Q4_0"):
        int4_formats.GGUFExperts(path, 3)


# ---- GPTQ ---------------------------------------------------------------------------------
# No GPTQ library installs here; the convention modelled below is AutoGPTQ's (and GPTQModel's
# "gptq" checkpoint_format, which transformers' GPTQConfig calls v1): qweight [in/8, out] with
# input column 8i + j in bits 4j of qweight[i], qzeros [groups, out/8] with output row n in bits
# 4 (n % 8) holding zero - 1, and dequantization scales[g_idx[c], n] * (q - (stored + 1)) as in
# auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py; GPTQModel's "gptq_v2" stores the zero itself
# (vLLM PR #26092). Symmetric 4-bit GPTQ has zero 8, i.e. qzeros words 0x77777777 in v1.


def gptq_pack(u, scales, zeros, fmt="gptq"):
    """AutoGPTQ-style tensors from unsigned nibbles u [rows, cols], scales [rows, groups] and
    true zero points zeros [rows, groups]: (qweight, scales, qzeros)."""
    rows, cols = u.shape
    uw = u.T.reshape(cols // 8, 8, rows).astype(np.uint64)
    qweight = (uw << (4 * np.arange(8, dtype=np.uint64))[None, :, None]).sum(axis=1)
    stored = zeros.T - (1 if fmt == "gptq" else 0)  # [groups, rows]
    pad = -rows % 8
    zw = np.pad(stored, [(0, 0), (0, pad)]).reshape(stored.shape[0], -1, 8).astype(np.uint64)
    qzeros = (zw << (4 * np.arange(8, dtype=np.uint64))).sum(axis=-1)
    as_i32 = lambda a: a.astype(np.uint32).view(np.int32)  # noqa: E731
    return as_i32(qweight), scales.T.astype(np.float16), as_i32(qzeros)


def gptq_dequantize(qweight, scales, qzeros, g_idx, fmt="gptq"):
    """The documented GPTQ dequantization (above), in float64: W [out, in]."""
    qw = qweight.view(np.uint32)
    u = (qw[:, None, :] >> (4 * np.arange(8, dtype=np.uint32))[None, :, None]) & 15
    u = u.reshape(-1, qw.shape[1])  # [in, out]
    z = (qzeros.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    z = z.reshape(qzeros.shape[0], -1)[:, : qw.shape[1]] + (1 if fmt == "gptq" else 0)
    s = scales.astype(np.float64)
    return (s[g_idx] * (u.astype(np.float64) - z[g_idx])).T


@pytest.mark.parametrize("rows, cols, g", [(16, 64, 32), (13, 256, 128), (8, 192, 64), (3, 32, 32)])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_converter_matches_the_gptq_dequantization(rng, rows, cols, g, fmt):
    u = rng.integers(0, 16, (rows, cols))
    u.reshape(-1)[:16] = np.arange(16)
    scales = rng.uniform(0.001, 0.1, (rows, cols // g))
    zeros = np.full((rows, cols // g), 8)
    qweight, sc, qzeros = gptq_pack(u, scales, zeros, fmt)
    g_idx = np.arange(cols, dtype=np.int32) // g
    b, s, group = int4_formats.gptq_to_int4(qweight, sc, qzeros, g_idx, checkpoint_format=fmt)
    assert group == g and b.shape == (rows, cols // 2) and s.dtype == np.float32
    assert b.tobytes() == reference.pack_int4(u - 8).tobytes()
    expected = gptq_dequantize(qweight, sc, qzeros, g_idx, fmt)
    assert np.array_equal(reference.dequantize_int4(b, s, cols, g), expected)
    b2, s2, _ = int4_formats.gptq_to_int4(
        torch.from_numpy(qweight),
        torch.from_numpy(sc),
        torch.from_numpy(qzeros),
        checkpoint_format=fmt,
    )  # torch tensors as safetensors reads them, and no g_idx
    assert b2.tobytes() == b.tobytes() and s2.tobytes() == s.tobytes()


def test_gptq_that_does_not_fit_is_a_clear_error(rng):
    rows, cols, g = 8, 64, 32
    u = rng.integers(0, 16, (rows, cols))
    scales = rng.uniform(0.01, 0.1, (rows, cols // g))
    zeros = np.full((rows, cols // g), 8)
    conv = int4_formats.gptq_to_int4
    qweight, sc, qzeros = gptq_pack(u, scales, zeros, "gptq")
    with pytest.raises(ValueError, match=r"qzeros: group 0, row 0 stores zero point 7, expected 8"):
        conv(qweight, sc, qzeros, checkpoint_format="gptq_v2", name="l")  # v1 read as v2
    asym = zeros.copy()
    asym[5, 1] = 9
    qweight, sc, qzeros = gptq_pack(u, scales, asym, "gptq")
    with pytest.raises(ValueError, match=r"l.qzeros: group 1, row 5 stores zero point 8, expect"):
        conv(qweight, sc, qzeros, name="l")
    qweight, sc, qzeros = gptq_pack(u, scales, zeros, "gptq")
    act_order = rng.permutation(np.arange(cols) // g).astype(np.int32)
    with pytest.raises(ValueError, match=r"l.g_idx is not c // 32 .*act-order"):
        conv(qweight, sc, qzeros, act_order, name="l")
    with pytest.raises(ValueError, match=r"l.g_idx is not c // 32 \(63 entries for 64 columns"):
        conv(qweight, sc, qzeros, np.arange(63) // g, name="l")
    q16, s16, z16 = gptq_pack(u, rng.uniform(0.01, 0.1, (rows, 4)), np.full((rows, 4), 8))
    with pytest.raises(ValueError, match=r"l.scales: 4 scale\(s\) per row of 64 columns means "):
        conv(q16, s16, z16, name="l")
    with pytest.raises(ValueError, match=r"l.scales must have shape \[groups, 8\]"):
        conv(qweight, sc[:, :4], qzeros, name="l")
    with pytest.raises(ValueError, match=r"l.qzeros must be int32 with shape \[2, 1\]"):
        conv(qweight, sc, qzeros[:1], name="l")
    with pytest.raises(ValueError, match=r"checkpoint_format must be one of"):
        conv(qweight, sc, qzeros, checkpoint_format="awq")


# ---- a compressed-tensors MoE checkpoint, end to end --------------------------------------

CT_PREFIX = "model.layers.2.mlp.experts"


def write_ct_checkpoint(ct, tmp_path, rng, E, H, I, g, *, edit=None, drop=None):  # noqa: E741
    """One layer in Kimi-K2-Thinking's layout: ``...experts.{e}.{proj}.weight_packed`` (int32,
    compressed_tensors' pack_to_int32), ``weight_scale`` (bf16) and ``weight_shape``, with a
    bf16 router beside it. Returns (path, {(e, proj): (q, scale)})."""
    t = {"model.layers.2.mlp.gate.weight": torch.zeros(E, H, dtype=torch.bfloat16)}
    truth = {}
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for e in range(E):
        for n in BASE:
            rows, cols = shapes[n]
            q = random_q(rng, (rows, cols))
            scale = torch.from_numpy(rng.uniform(0.002, 0.05, (rows, -(-cols // g))))
            scale = scale.to(torch.bfloat16)
            key = f"{CT_PREFIX}.{e}.{n}.weight"
            t[key + "_packed"] = ct.pack_to_int32(torch.from_numpy(q), 4)
            t[key + "_scale"] = scale
            t[key + "_shape"] = torch.tensor([rows, cols])
            truth[e, n] = (q, scale)
    t.update(edit or {})
    t.pop(drop, None)
    path = tmp_path / "model-00001-of-00001.safetensors"
    pytest.importorskip("safetensors.torch").save_file(t, str(path))
    return path, truth


@pytest.mark.parametrize("E, H, I, g", [(4, 200, 70, 32), (3, 256, 128, 64)])  # noqa: E741
def test_compressed_tensors_checkpoint_loads_into_int4_as_it_ships(ct, rng, tmp_path, E, H, I, g):  # noqa: E741
    """from_safetensors(quant="int4"): the checkpoint's nibbles and scales bit for bit with the
    checkpoint's group size; dequantized_weights() are the checkpoint's q * scale exactly; the
    forward and backward meet the bf16 goals against the float64 model of those weights (W4A8
    activations, as the int4 engine computes); a bf16 layer holds the dequantized weights."""
    from ktsft.torch import MoELoRA

    path, truth = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, g)
    layer = MoELoRA.from_safetensors(
        path,
        CT_PREFIX,
        E,
        quant="int4",
        lora_rank=4,
        init_lora_weights=False,
        num_experts_per_tok=2,
    )
    assert layer.moe.config.group_size == g
    got, deq = layer.moe.base_weights(), layer.moe.dequantized_weights()
    exact = {n: np.empty(deq[n].shape, np.float64) for n in BASE}
    for e in range(E):
        for n, sn in zip(BASE, SCALES):
            q, scale = truth[e, n]
            assert got[n][e].tobytes() == reference.pack_int4(q).tobytes(), (e, n)
            assert np.array_equal(got[sn][e], scale.float().numpy()), (e, n)
            full = np.repeat(scale.float().numpy().astype(np.float64), g, axis=1)
            exact[n][e] = q * full[:, : q.shape[1]]
    for n in BASE:
        assert np.array_equal(deq[n], exact[n]), n
    T, k = 13, 2
    ids, w = make_routing(rng, T, k, E, pad=0.1)
    x, go = make_tokens(rng, T, H), make_tokens(rng, T, H)
    check_against_reference(layer, exact, x, ids, w, go, "int4")
    plain = MoELoRA.from_safetensors(path, CT_PREFIX, E, quant="bf16", lora_rank=4)
    for n in BASE:
        bf16 = torch.from_numpy(exact[n]).to(torch.bfloat16).view(torch.uint16).numpy()
        assert np.array_equal(plain.moe.base_weights()[n].view(np.uint16), bf16), n
    layout = ktsft.checkpoint.find_module_experts(
        ktsft.checkpoint.SafetensorsIndex(path), CT_PREFIX, E
    )
    assert layout.int4_group_size == g and (layout.hidden_size, layout.intermediate_size) == (H, I)


def test_compressed_tensors_checkpoint_errors(ct, rng, tmp_path):
    from ktsft.torch import MoELoRA

    E, H, I = 2, 64, 32  # noqa: E741
    key = f"{CT_PREFIX}.1.up_proj.weight"
    load = lambda p, **kw: MoELoRA.from_safetensors(p, CT_PREFIX, E, lora_rank=2, **kw)  # noqa: E731
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32)
    with pytest.raises(ValueError, match=r"group_size=64 was asked for, but the int4 checkpoint"):
        load(path, quant="int4", group_size=64)
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32, drop=key + "_shape")
    with pytest.raises(KeyError, match=r"1 compressed-tensors int4 tensor\(s\) not found.*1.up_pr"):
        load(path, quant="int4")
    zp = {key + "_zero_point": torch.zeros(4, 1, dtype=torch.int32)}
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32, edit=zp)
    with pytest.raises(ValueError, match=r"1.up_proj.weight_zero_point is in .*asymmetric"):
        load(path, quant="int4")
    bad = {key + "_scale": torch.ones(I, 3, dtype=torch.bfloat16)}
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32, edit=bad)
    with pytest.raises(
        ValueError, match=r"1.up_proj.weight_scale .* shape \[32, 2\].*got BF16 \[32"
    ):
        load(path, quant="int4")
    bad = {key + "_packed": torch.zeros(I, 7, dtype=torch.int32)}
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32, edit=bad)
    with pytest.raises(
        ValueError, match=r"1.up_proj.weight_packed .* \[32, 8\].*got I32 \[32, 7\]"
    ):
        load(path, quant="int4")
    g16 = {
        f"{CT_PREFIX}.{e}.{n}.weight_scale": torch.ones(r, c // 16, dtype=torch.bfloat16)
        for e in range(E)
        for n, (r, c) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items()
    }
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32, edit=g16)
    with pytest.raises(ValueError, match=r"gate_proj: 4 per 64 columns.*no single group size"):
        load(path, quant="int4")
    shape = {key + "_shape": torch.tensor([I, H + 8])}  # weight_shape disagrees with the header
    path, _ = write_ct_checkpoint(ct, tmp_path, rng, E, H, I, 32, edit=shape)
    with pytest.raises(ValueError, match=r"up_proj.weight_packed: expected shape \[32, 9\]"):
        load(path, quant="int4")
