"""Int8Linear and Int4Linear against the float layer they replace, with error bounds from the step.

Bounds: the reference quantizers put each weight within half a step of the original (int4 also within
the bfloat16 rounding of its scale and zero), so a layer's output differs from the float one by at
most sum_k |x_k| * err_k per output. The CPU kernels compute with bfloat16 activations and outputs,
which adds at most a few units of bfloat16 rounding (2^-8) of sum_k |x_k w_k|.
"""

import pytest
import torch
import torch.nn.functional as F

from keel.errors import ModelLoadError
from keel.quant.int4 import Int4Linear, dequantize_int4, quantize_int4, unpack_nibbles
from keel.quant.int8 import Int8Linear, dequantize_int8, quantize_int8

BF16_ROUNDING = 2.0 ** -8


def _weight(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) / inp ** 0.5
    w[0, :5] *= 8  # an outlier row: its scale is large, the others' are not
    return w


def _elementwise_bound(method, q, group=None):
    """Per-weight bound of |dequantized - original| from the quantizer's own step."""
    if method == "int8":
        return q["scales"][:, None].expand(-1, q["qweight"].shape[1]) / 2 * (1 + 1e-6) + 1e-7  # + fp32 rounding
    s, z = q["scales"].float(), q["zeros"].float()
    # half a step, plus the bf16 rounding of scale (times |code - 8| <= 8) and zero
    per_group = s / 2 + BF16_ROUNDING * (8 * s + z.abs()) + 1e-7
    return per_group.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("method, group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_reference_quantizer_error_is_within_half_a_step(method, group):
    w = _weight(96, 256)
    if method == "int8":
        q = quantize_int8(w)
        deq = dequantize_int8(q["qweight"], q["scales"])
        assert q["qweight"].dtype == torch.int8 and q["qweight"].abs().max() <= 127
    else:
        q = quantize_int4(w, group)
        deq = dequantize_int4(unpack_nibbles(q["qweight"]), q["scales"], q["zeros"])
        assert q["qweight"].shape == (96, 128) and q["scales"].shape == (96, 256 // group)
    assert ((deq - w).abs() <= _elementwise_bound(method, q, group)).all()


def test_constant_and_zero_rows_quantize_exactly():
    w = torch.zeros(32, 64)
    w[1] = 0.25
    q8 = quantize_int8(w)
    assert torch.equal(dequantize_int8(q8["qweight"], q8["scales"]), w)
    q4 = quantize_int4(w, 32)
    torch.testing.assert_close(dequantize_int4(unpack_nibbles(q4["qweight"]), q4["scales"], q4["zeros"]), w)


def _layer(cls, w, group, dtype, bias=None):
    layer = cls(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype, group_size=group, name="test")
    for name, t in cls.quantize(w, group).items():
        getattr(layer, name).weight_loader(getattr(layer, name), t)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias.to(dtype))
    return layer


CASES = [(Int8Linear, None), (Int4Linear, 32), (Int4Linear, 64)]


@pytest.mark.parametrize("cls, group", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 300])  # 300: above the kernel row limits of a float32 model
def test_layer_output_against_float_reference(cls, group, dtype, rows):
    w, b = _weight(192, 128), torch.randn(192) * 0.1
    q = cls.quantize(w, group)
    layer = _layer(cls, w, group, dtype, bias=b)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer.prepare()
    if torch.backends.mkldnn.is_available():  # this CPU and build have the kernels: they must be in use
        assert layer.kernel != "reference", layer.kernel
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (rows, 192) and y.dtype == dtype
    xf = x.float()
    want = F.linear(xf, w, b.to(dtype).float())
    err = _elementwise_bound("int8" if cls is Int8Linear else "int4", q, group)
    bound = xf.abs() @ err.t() + 4 * BF16_ROUNDING * (xf.abs() @ w.abs().t() + b.abs()) + 1e-5
    assert ((y.float() - want).abs() <= bound).all()


@pytest.mark.parametrize("cls, group", CASES)
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_own_kernel_keeps_float32_activations(cls, group, rows):
    """keel's CPU kernel (a float32 model, a few rows) computes in float32: it agrees with
    dequantize-then-matmul to float32 rounding, far inside the bf16 bound the other kernels get."""
    from keel.kernels.cpu import kernels
    if kernels() is None:
        pytest.skip("keel's CPU kernels cannot run here (no C compiler, AVX2 or FMA)")
    # int4: 200 output rows, which PyTorch's int4 operator refuses (it wants multiples of 16), so keel's
    # kernel serves; where both can, PyTorch's is the faster and is used
    out = 256 if cls is Int8Linear else 200
    layer = _layer(cls, _weight(out, 192), group, torch.float32, bias=torch.randn(out))
    ref_w = layer.dequantize(torch.float32)
    layer.prepare()
    assert layer.kernel.startswith("keel ") and layer.fast_max_rows >= rows
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        got = layer(x)
    want = x @ ref_w.t() + layer.bias
    assert ((got - want).abs() <= 1e-5 * (x.abs() @ ref_w.abs().t() + 1)).all()
    assert torch.equal(layer.dequantize(torch.float32), ref_w)


@pytest.mark.parametrize("cls, group", CASES)
def test_kernel_matches_reference_path(cls, group):
    """The fast kernel against dequantize-then-matmul on the same quantized weights: only the
    kernel's bfloat16 rounding may differ."""
    layer = _layer(cls, _weight(256, 192), group, torch.float32)
    ref_w = layer.dequantize(torch.float32)
    layer.prepare()
    x = torch.randn(4, 192)
    with torch.inference_mode():
        got = layer(x)
    want = x @ ref_w.t()
    assert ((got - want).abs() <= 3 * BF16_ROUNDING * (x.abs() @ ref_w.abs().t()) + 1e-6).all()
    assert torch.equal(layer.dequantize(torch.float32), ref_w)  # the kernel layout reads back exactly
    ids = torch.tensor([0, 5, 31, 32, 255])
    assert torch.equal(layer.rows(ids), ref_w[ids])


@pytest.mark.parametrize("cls, group", CASES)
def test_fused_shards_quantize_independently(cls, group):
    """A fused q/k/v layer loaded shard by shard equals one layer loaded with the whole weight: rows
    (and groups along a row) never mix, so each checkpoint projection is quantized on its own."""
    sizes = {"q": 64, "k": 32, "v": 32}
    parts = {s: _weight(n, 64, seed=i) for i, (s, n) in enumerate(sizes.items())}
    fused = cls(64, sizes, dtype=torch.float32, group_size=group)
    for shard, w in parts.items():
        for name, t in cls.quantize(w, group).items():
            getattr(fused, name).weight_loader(getattr(fused, name), t, shard)
    whole = _layer(cls, torch.cat(list(parts.values())), group, torch.float32)
    for name in fused.tensor_specs():
        assert torch.equal(getattr(fused, name), getattr(whole, name))
    assert fused.output_sizes == sizes and fused.shard_slice("k") == slice(64, 96)


def test_output_rows_the_cpu_kernel_cannot_take_use_the_reference():
    # bfloat16: PyTorch's int4 kernel (keel's own serves float32 models only) wants rows in 16s
    layer = _layer(Int4Linear, _weight(40, 64), 32, torch.bfloat16)  # 40 rows: not a multiple of 16
    layer.prepare()
    assert layer.kernel == "reference"
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t())


def test_pack_for_cpu_prepares_instead_of_packing_a_dense_weight():
    layer = _layer(Int8Linear, _weight(64, 64), None, torch.float32)
    assert not hasattr(layer, "weight")
    layer.pack_for_cpu()
    assert layer.packed is None and layer.fast is not None


def test_group_size_must_divide_the_layer():
    with pytest.raises(ModelLoadError, match="group size 64 does not divide the 96 input channels of mlp.down"):
        Int4Linear(96, 64, group_size=64, name="mlp.down")


@pytest.mark.parametrize("bad, words", [
    (lambda: torch.zeros(64, 64, dtype=torch.uint8), "uint8 (64, 64), but int8 needs int8 (64, 64)"),
    (lambda: torch.zeros(32, 64, dtype=torch.int8), "int8 (32, 64), but int8 needs int8 (64, 64)"),
])
def test_loader_names_a_tensor_that_does_not_fit(bad, words):
    layer = Int8Linear(64, 64, name="model.layers.0.mlp.down_proj")
    with pytest.raises(ModelLoadError) as err:
        layer.qweight.weight_loader(layer.qweight, bad())
    assert "model.layers.0.mlp.down_proj.qweight" in str(err.value) and words in str(err.value)
    assert "does not match" in str(err.value)


def test_bf16_layer_uses_own_kernel_for_decode_rows():
    """A bfloat16 dense layer on a CPU without bf16 matmuls: keel's kernel for a few rows, computing in
    float32 on the bf16 weights; F.linear beyond. Both agree with the float32 product of the same weights."""
    from keel.engine.device import BF16_CPU_FLAGS, cpu_flags
    from keel.kernels.cpu import kernels
    from keel.layers.linear import OWN_BF16_MAX_ROWS, Linear
    if kernels() is None or cpu_flags() & BF16_CPU_FLAGS:
        pytest.skip("keel's bf16 kernel is not used on this CPU")
    layer = Linear(192, 96, bias=True, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    w, b = layer.weight.detach().float().clone(), layer.bias.detach().float().clone()
    assert layer.pack_for_cpu() and layer.own is not None
    for rows in (1, OWN_BF16_MAX_ROWS, OWN_BF16_MAX_ROWS + 3):
        x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.inference_mode():
            y = layer(x)
        want = x.float() @ w.t() + b
        assert y.dtype == torch.bfloat16
        assert ((y.float() - want).abs() <= 2 ** -7 * want.abs() + 1e-2).all()


def test_rms_norm_kernel_matches_torch():
    from keel.layers.norm import RMSNorm
    norm = RMSNorm(200, 1e-6)  # 200: not a multiple of 16, so the scalar tail runs too
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(5, 200) * 3
    with torch.inference_mode():
        got = norm(x)
    torch.testing.assert_close(got, F.rms_norm(x, (200,), norm.weight, 1e-6), rtol=1e-5, atol=1e-6)
    from keel.kernels.cpu import kernels
    assert (norm.own is not False) == (kernels() is not None)  # the kernel is used wherever it can run
