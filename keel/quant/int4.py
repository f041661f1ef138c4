"""Weight-only int4: per group of `group_size` input channels a scale and a zero point,
weight ≈ (code - 8) * scale + zero with codes 0..15. `zero` is the weight value of the middle code,
the convention of PyTorch's int4 kernels (CPU and CUDA), so scales and zeros go to them unchanged.

Checkpoint tensors: qweight uint8 [out, in / 2] (two codes a byte, the even input channel in the low
nibble), scales and zeros bfloat16 [out, in / group_size]. Scales and zeros are bfloat16 because the
kernels take them so; the quantizer picks the codes against the rounded values.

Scales and zeros may also be float32: GGUF's Q4_0/Q4_1 blocks carry float16 ones, which bfloat16
would round, so they load exactly (keel/quant/gguf_blocks.py).

Kernel, chosen by measurement (bench/results/cpu_kernels.md, bench/results/quant.md):
- CPU, float32 model: keel's matmul (keel/kernels/cpu_gemm.c) up to INT4_OWN_MAX_ROWS rows, activations
  and arithmetic in float32, each weight computed exactly as dequantize_int4 does; it reads a quarter
  of the float32 bytes, which is what decode is bound by. PyTorch's int4 operator needs bfloat16
  activations.
- CPU, bfloat16 model: torch._weight_int4pack_mm_for_cpu over the weight reordered by
  _convert_weight_to_int4pack_for_cpu, faster than the float32 oneDNN layer. Where keel's kernel cannot run on a float32 model, the same operator with activations cast to
  bfloat16, up to INT4_CPU_FP32_MAX_ROWS rows; dequantize-then-matmul above.
- CUDA: torch._weight_int4pack_mm (tinygemm) for bfloat16 models, checked on a probe at load (no GPU
  was at hand to measure it: where it fails the check, the reference is used).
- elsewhere: dequantize-then-matmul, the reference.
"""

from __future__ import annotations

import torch

from keel.errors import ModelLoadError
from keel.kernels.cpu import W_INT4
from keel.quant.layer import QuantEmbedding, QuantLinear, sample_rows

# Rows above which a float32 model on CPU dequantizes and runs the dense matmul (see the module doc).
INT4_CPU_FP32_MAX_ROWS = 64
# Rows up to which keel's own matmul (keel/kernels/cpu_gemm.c) serves a float32 model on CPU; more rows
# dequantize and run the dense matmul. It widens each weight panel once into a float32 buffer the size
# of L1 and multiplies every row by it, so its cost per row falls like the dense kernel's.
INT4_OWN_MAX_ROWS = 256


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, in] uint8 0..15 -> [rows, in / 2], even channel in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """weight [rows, in] float -> {"qweight", "scales", "zeros"}: min/max asymmetric per group, so each
    element is within half a step (plus the bfloat16 rounding of its scale and zero) of the original."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ModelLoadError(f"group size {group_size} does not divide {cols} input channels")
    w = weight.float().reshape(rows, cols // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    # A constant group gets a tiny scale, so that every code reconstructs its value (the zero).
    scales = ((hi - lo) / 15).clamp_(min=1e-20).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    codes = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp_(0, 15)
    codes = codes.to(torch.uint8).reshape(rows, cols)
    return {"qweight": pack_nibbles(codes), "scales": scales, "zeros": zeros}


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes [rows, in] (unpacked), scales/zeros [rows, in / group] -> float32 [rows, in]."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    w = (codes.view(rows, groups, cols // groups).float() - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(rows, cols)


def _cpu_layout_codes(packed: torch.Tensor, block_n: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [rows, in] back from _convert_weight_to_int4pack_for_cpu's layout, [out / block_n, in,
    block_n / 2] bytes with row j of a block in the low nibbles and row j + block_n / 2 in the high ones
    (as observed; prepare() checks it on the layer's own codes before relying on it)."""
    n, half_k = packed.shape
    k, half = 2 * half_k, block_n // 2
    p = packed.view(n // block_n, k, half)
    if ids is None:
        return torch.cat((p & 15, p >> 4), dim=2).transpose(1, 2).reshape(n, k)
    j = ids % block_n
    v = p[ids // block_n, :, j % half]  # [len(ids), in]
    return (v >> (4 * (j >= half)).to(torch.uint8)[:, None]) & 15


class Int4Linear(QuantLinear):
    method = "int4"
    cpu_packed: torch.Tensor | None = None  # the CPU kernel's layout, once prepared
    kernel_sz: torch.Tensor | None = None  # [in / group, out, 2] bfloat16: scale and zero, as the kernels take them

    def tensor_specs(self):
        n, k, g = self.out_features, self.in_features, self.group_size
        if k % g:
            raise ModelLoadError(f"int4 group size {g} does not divide the {k} input channels of {self.name}")
        return {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, k // g), torch.bfloat16),
                "zeros": ((n, k // g), torch.bfloat16)}

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int | None) -> dict[str, torch.Tensor]:
        return quantize_int4(weight, group_size)

    def _state(self, ids: torch.Tensor | None = None):
        """(codes, scales, zeros) of all rows or rows `ids`, from whichever layout the layer holds."""
        if self.cpu_packed is not None:
            sz = self.kernel_sz if ids is None else self.kernel_sz[:, ids]
            return _cpu_layout_codes(self.cpu_packed, self.block_n, ids), sz[..., 0].t(), sz[..., 1].t()
        if ids is None:
            return unpack_nibbles(self.qweight), self.scales, self.zeros
        return unpack_nibbles(self.qweight[ids]), self.scales[ids], self.zeros[ids]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.cpu_packed is None and "qweight" not in self._parameters:
            # only tinygemm's opaque layout is left: read the weight back through the kernel
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self._cuda[0].device)
            return self.fast(eye).t().to(dtype or self.dtype)
        return dequantize_int4(*self._state()).to(dtype or self.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.cpu_packed is None and "qweight" not in self._parameters:
            return self.dequantize(dtype)[ids]
        return dequantize_int4(*self._state(ids)).to(dtype or self.dtype)

    def _load_quantized(self, param, loaded, shard=None):
        if param is not self.qweight and loaded.dtype in (torch.float16, torch.float32) and param.dtype != loaded.dtype:
            # scales and zeros bfloat16 would round (GGUF's float16 ones): kept as they come
            param.data = param.data.to(loaded.dtype)
        super()._load_quantized(param, loaded, shard)

    def prepare(self) -> None:
        self.fast = False
        device = self.qweight.device.type
        if device == "cpu" and self.dtype == torch.float32 and self._prepare_own():
            return
        if device == "cpu" and self.out_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            self._prepare_cpu()
        elif device == "cuda" and self.dtype == torch.bfloat16 and hasattr(torch, "_weight_int4pack_mm"):
            self._prepare_cuda()

    def _prepare_own(self) -> bool:
        """A float32 model on CPU: keel's matmul reads the checkpoint layout as it is and computes in
        float32, for up to INT4_OWN_MAX_ROWS rows; more rows dequantize and run the dense matmul."""
        from keel.kernels.backend import of
        own = of(self).cpu_kernels(self.dtype)
        if own is None or self.group_size % 16 or self.in_features % self.group_size:
            return False
        if self.zeros.dtype != self.scales.dtype:
            self.scales.data = self.scales.data.float()
            self.zeros.data = self.zeros.data.float()

        def fast(x):
            return own.gemm(x.contiguous(), W_INT4, self.qweight, self.scales, self.zeros, self.group_size)
        if not self.check_fast(fast):
            return False
        self.fast, self.kernel, self.fast_max_rows = fast, "keel int4 (float32 rows)", INT4_OWN_MAX_ROWS
        self._gemm = W_INT4, self.qweight, self.scales, self.zeros, self.group_size, INT4_OWN_MAX_ROWS
        return True

    def _prepare_cpu(self) -> None:
        codes = unpack_nibbles(self.qweight)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        except RuntimeError:  # shapes this build's kernel refuses
            return
        # Row lookups and dequantize-then-matmul read the kernel's layout: only where it is understood.
        ids = sample_rows(self.out_features)
        block_n = next((b for b in (32, 64) if self.out_features % b == 0
                        and torch.equal(_cpu_layout_codes(packed, b, ids), codes[ids])), None)
        if block_n is None:
            return
        self.cpu_packed, self.block_n = packed, block_n
        self.kernel_sz = torch.stack((self.scales.t(), self.zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
        if not self.check_fast(self._cpu_int4):
            self.cpu_packed = self.kernel_sz = None
            return
        for name in ("qweight", "scales", "zeros"):
            delattr(self, name)
        self.fast, self.kernel = self._cpu_int4, "cpu _weight_int4pack_mm_for_cpu"
        self.fast_max_rows = 1 << 62 if self.dtype == torch.bfloat16 else INT4_CPU_FP32_MAX_ROWS

    def _cpu_int4(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.cpu_packed, self.group_size,
                                                       self.kernel_sz)
        return y.to(x.dtype)

    def _prepare_cuda(self) -> None:
        k = self.in_features
        tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
        if tiles is None or self.out_features % 8:
            return
        try:
            codes = unpack_nibbles(self.qweight)
            # tinygemm wants the even channel in the high nibble
            packed = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4) | codes[:, 1::2], tiles)
        except RuntimeError:
            return
        sz = torch.stack((self.scales.t(), self.zeros.t()), dim=-1).to(torch.bfloat16).contiguous()

        def fast(x):
            return torch._weight_int4pack_mm(x, packed, self.group_size, sz)
        if self.check_fast(fast):
            self._cuda = (packed, sz)
            self.fast, self.kernel, self.fast_max_rows = fast, "cuda _weight_int4pack_mm", 1 << 62
            if not isinstance(self, QuantEmbedding):  # lookups read the portable layout; a matmul needs none
                for name in ("qweight", "scales", "zeros"):
                    delattr(self, name)

    def resident_tensors(self):
        if self.cpu_packed is not None:
            return [self.cpu_packed, self.kernel_sz]
        return super().resident_tensors() + list(getattr(self, "_cuda", ()))


class Int4Embedding(QuantEmbedding, Int4Linear):
    """Token embedding with int4 rows (quantize_embeddings); the rows are also the tied head's weight."""
