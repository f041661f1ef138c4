"""Weight-only int8: symmetric, one scale per output channel (weight ≈ qweight * scales[:, None]).

Checkpoint tensors: qweight int8 [out, in] (codes -127..127), scales float32 [out].

With a group size (only GGUF's Q8_0 blocks load so, see keel/quant/gguf_blocks.py): one scale per
group of input channels, scales [out, in / group], float16 as the file has them; keel's CPU kernel or
the reference compute with it (PyTorch's int8 operator has per-channel scales only).

Kernel, chosen by measurement (bench/quant.py, table in bench/results/quant.md):
- CPU: torch._weight_int8pack_mm, which reads the int8 weight as is and wants bfloat16 activations; it
  beats the oneDNN-packed float32 layer and bf16 F.linear at a few rows. Given float32 activations the
  same operator has no vectorised path, so a float32 model casts x to bfloat16 around it and applies
  the float32 scales after it (the kernel gets unit scales): the channel scales stay exact.
- With more rows float32 oneDNN beats the kernel, and from larger batches dequantizing (one pass) and
  running the dense matmul wins, so a float32 model sends batches above INT8_CPU_FP32_MAX_ROWS (prefill
  chunks) that way and keeps the kernel below. A bfloat16 model always uses the kernel: bf16 F.linear
  on CPUs without bf16 matmuls is slower still at every size.
- elsewhere (CUDA, other CPUs): dequantize-then-matmul in the model dtype, the reference.
"""

from __future__ import annotations

import torch

from keel.errors import ModelLoadError
from keel.kernels.cpu import W_INT8G
from keel.quant.layer import QuantEmbedding, QuantLinear

# Rows above which a float32 model on CPU dequantizes and runs the dense matmul (see the module doc).
INT8_CPU_FP32_MAX_ROWS = 128
# Rows up to which a float32 model uses keel's own kernel (keel/kernels) instead of PyTorch's. Cold
# weights, 3072x576, microseconds (bench/results/cpu_kernels.md): keel 153 / 248 / 778 / 1499 / 3807 at
# 1 / 4 / 16 / 32 / 64 rows against PyTorch's 252 / 374 / 1173 / 2069 / 4195 (activations cast to bf16).
INT8_OWN_MAX_ROWS = 64


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """weight [rows, in] float -> {"qweight": int8 [rows, in], "scales": float32 [rows]}; each element is
    within scales[row] / 2 of the original (round to nearest). With a group size, float16 scales
    [rows, in / group_size], one per group."""
    w = weight.float()
    if group_size is not None:
        n, k = w.shape
        g = w.view(n, k // group_size, group_size)
        scales = (g.abs().amax(dim=-1) / 127).clamp_(min=2 ** -24).half()  # float16's smallest step
        q = torch.round(g / scales.float()[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)
        return {"qweight": q, "scales": scales}
    scales = (w.abs().amax(dim=1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)  # an all-zero row: q = 0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales[:, None]


class Int8Linear(QuantLinear):
    method = "int8"

    def tensor_specs(self):
        n, k, g = self.out_features, self.in_features, self.group_size
        if g is None:
            return {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.float32)}
        if k % g:
            raise ModelLoadError(f"int8 group size {g} does not divide the {k} input channels of {self.name}")
        return {"qweight": ((n, k), torch.int8), "scales": ((n, k // g), torch.float16)}

    def _load_quantized(self, param, loaded, shard=None):
        if param is self.scales and loaded.dtype == torch.float32 and param.dtype != loaded.dtype:
            param.data = param.data.float()  # group scales more exact than float16: kept as they come
        super()._load_quantized(param, loaded, shard)

    def _weights(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return torch.mul(q, s[:, None])  # int8 * float32 promotes to float32 in one pass
        n, k = q.shape
        return (q.view(n, -1, self.group_size).float() * s.float()[..., None]).view(n, k)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int | None = None) -> dict[str, torch.Tensor]:
        return quantize_int8(weight, group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._weights(self.qweight, self.scales).to(dtype or self.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._weights(self.qweight[ids], self.scales[ids]).to(dtype or self.dtype)

    def prepare(self) -> None:
        self.fast = False
        if self.qweight.device.type != "cpu":
            return
        from keel.kernels.backend import of
        own = of(self).cpu_kernels(self.dtype) if self.in_features % 8 == 0 else None
        fast = self._own_int8(own) if own is not None else None
        if fast is not None and self.check_fast(fast):
            self._own = fast
            self._gemm = W_INT8G, self.qweight, self.scales, None, self.group_size or self.in_features, INT8_OWN_MAX_ROWS
            torch_ok = hasattr(torch, "_weight_int8pack_mm") and self.group_size is None
            self._kernel_scales = torch.ones_like(self.scales, dtype=torch.bfloat16) if torch_ok else None
            self.fast = self._fp32_rows
            self.kernel = "keel int8 (float32 rows)" + (", cpu _weight_int8pack_mm" if torch_ok else "")
            self.fast_max_rows = INT8_CPU_FP32_MAX_ROWS if torch_ok else INT8_OWN_MAX_ROWS
            return
        if not hasattr(torch, "_weight_int8pack_mm") or self.group_size is not None:
            return
        bf16 = self.dtype == torch.bfloat16
        # bf16 model: the scales go into the kernel; otherwise unit scales, exact float32 ones after
        self._kernel_scales = self.scales.to(torch.bfloat16) if bf16 else torch.ones_like(self.scales, dtype=torch.bfloat16)
        if self.check_fast(self._cpu_int8):
            self.fast, self.kernel = self._cpu_int8, "cpu _weight_int8pack_mm"
            self.fast_max_rows = 1 << 62 if bf16 else INT8_CPU_FP32_MAX_ROWS

    def _fp32_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 model: keel's kernel for a few rows (activations stay float32), PyTorch's above."""
        if x.shape[0] <= INT8_OWN_MAX_ROWS or self._kernel_scales is None or self.own_all_rows:
            return self._own(x)
        return self._cpu_int8(x)

    def _own_int8(self, own):
        """keel's matmul: per-channel int8 is its grouped int8 with one group of all input channels."""
        g = self.group_size or self.in_features
        return lambda x: own.gemm(x.contiguous(), W_INT8G, self.qweight, self.scales, group=g)

    def _cpu_int8(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            return torch._weight_int8pack_mm(x, self.qweight, self._kernel_scales)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._kernel_scales)
        return torch.mul(y, self.scales).to(x.dtype)  # bf16 * fp32 scales: one op, float32 out

    def resident_tensors(self):
        extra = [self._kernel_scales] if self.fast and getattr(self, "_kernel_scales", None) is not None else []
        return super().resident_tensors() + extra


class Int8Embedding(QuantEmbedding, Int8Linear):
    """Token embedding with int8 rows (quantize_embeddings); the rows are also the tied head's weight."""
