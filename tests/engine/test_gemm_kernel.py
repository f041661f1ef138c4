"""keel's CPU matmul (cpu_gemm.c) over every weight format against the float32 product of the same
weights, and the dense layer that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel.kernels.cpu import W_BF16, W_F32, W_INT4, W_INT8G, kernels

pytestmark = pytest.mark.skipif(kernels() is None, reason="keel's CPU kernels need Linux, AVX2, FMA and a C compiler")

ROWS = (1, 2, 3, 4, 5, 8, 17)  # the few-row path (up to 4) and the panel path, with partial tiles


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    want = x.double() @ w.double().t()
    bound = 1e-5 * (x.abs().double() @ w.abs().double().t()) + 1e-6  # float32 rounding of the sums
    assert got.shape == want.shape
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("n,k", [(1, 16), (2, 32), (3, 48), (7, 64), (13, 96), (50, 128), (5, 40)])
def test_float_formats(n, k, isa):
    from keel.kernels.cpu import runnable_isas
    own = kernels(isa) if isa in runnable_isas() else None
    if own is None:
        pytest.skip(f"this CPU does not run keel's {isa} build")
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g)
    for m in ROWS:
        x = torch.randn(m, k, generator=g)
        _check(own.gemm(x, W_F32, w), x, w)
        wb = w.bfloat16()
        _check(own.gemm(x, W_BF16, wb), x, wb.float())


@pytest.mark.parametrize("group", [16, 32, 48, 64, 128])  # 48: not a power of two times 16, panel path only
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4(group, sdtype):
    own = kernels()
    from keel.quant.int4 import dequantize_int4, pack_nibbles
    g = torch.Generator().manual_seed(group)
    for n, k in [(1, 128), (5, 256), (14, 384)]:
        if k % group:
            continue
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        scales = (torch.rand(n, k // group, generator=g) + 0.1).to(sdtype)
        zeros = torch.randn(n, k // group, generator=g).to(sdtype)
        w = dequantize_int4(codes, scales, zeros)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            _check(own.gemm(x, W_INT4, pack_nibbles(codes), scales, zeros, group), x, w)


@pytest.mark.parametrize("group", [8, 32, None])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16])
def test_int8(group, sdtype):
    own = kernels()
    g = torch.Generator().manual_seed(7)
    for n, k in [(1, 64), (6, 96), (33, 160)]:
        gs = group or k
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scales = (torch.rand(n, k // gs, generator=g) * 0.01).to(sdtype)
        w = (q.view(n, -1, gs).float() * scales.float()[..., None]).view(n, k)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            _check(own.gemm(x, W_INT8G, q, scales, group=gs), x, w)


def test_float32_layer_uses_the_kernel_for_few_rows_and_mkl_beyond():
    from keel.layers.linear import OWN_F32_MAX_ROWS, Linear
    layer = Linear(96, {"a": 40, "b": 17}, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert layer.pack_for_cpu() and layer.own is not None and layer.packed is None
    assert layer.weight.data_ptr() != 0 and layer.weight_bytes() == w.numel() * 4  # no second copy
    for rows in (1, 16, OWN_F32_MAX_ROWS, OWN_F32_MAX_ROWS + 1):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            got = layer(x)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_an_unwritable_kernel_cache_falls_back_instead_of_failing(tmp_path, monkeypatch, caplog):
    """A cache folder that cannot be created (a read-only home) must not stop keel: no kernels, a warning."""
    from keel.kernels import cpu
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("KEEL_CACHE_DIR", str(blocker / "below-a-file"))
    with caplog.at_level("WARNING", logger="keel"):
        assert cpu._compile() is None
    assert "cannot be cached" in caplog.text and "KEEL_CACHE_DIR" in caplog.text


def _isas():
    from keel.kernels.cpu import runnable_isas
    return runnable_isas() or ["avx2"]


@pytest.mark.parametrize("isa", _isas())  # every build this CPU runs, whatever the default picks
@pytest.mark.parametrize("fmt", ["f32", "f32-k24", "f32-k4096", "bf16", "int4-g32", "int4-g32-k4096", "int4-g48",
                                 "int8", "int8-g8", "int8-k24"])
def test_each_row_is_the_same_at_every_row_count(isa, fmt):
    """Batch invariance at the kernel: row i of x Wᵀ is bit for bit the same computed alone, in 3 rows or in
    37 (the few-row path and the panel path), for every weight format and shape class."""
    from keel.quant.int4 import pack_nibbles
    own = kernels(isa)
    if own is None:
        pytest.skip(f"keel's {isa} kernels do not build here")
    g = torch.Generator().manual_seed(3)
    # k4096: x's rows go through the matmul in chunks of 16 (about 256 KB each), so 37 rows span three
    n, k = 19, (24 if fmt.endswith("k24") else 4096 if fmt.endswith("k4096") else 96 * 2)
    fmt = fmt.removesuffix("-k4096")
    args: tuple = ()
    if fmt.startswith("f32"):
        args = (W_F32, torch.randn(n, k, generator=g))
    elif fmt == "bf16":
        args = (W_BF16, torch.randn(n, k, generator=g).bfloat16())
    elif fmt.startswith("int4"):
        group = int(fmt.split("-g")[1])
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        args = (W_INT4, pack_nibbles(codes), (torch.rand(n, k // group, generator=g) + 0.1).half(),
                torch.randn(n, k // group, generator=g).half(), group)
    else:
        group = 8 if fmt == "int8-g8" else k
        args = (W_INT8G, torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                torch.rand(n, k // group, generator=g) + 0.1, None, group)
    x = torch.randn(37, k, generator=g)
    full = own.gemm(x, *args)
    for rows in (slice(0, 1), slice(5, 6), slice(36, 37), slice(10, 13), slice(2, 6), slice(0, 5), slice(4, 21)):
        assert torch.equal(own.gemm(x[rows].contiguous(), *args), full[rows]), rows
