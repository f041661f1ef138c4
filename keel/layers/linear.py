"""The one linear layer every projection of every model goes through.

Quantized weight formats and LoRA adapters (later) plug in here: a layer knows its output slices
(q/k/v or gate/up when fused) so each can be loaded, quantized or adapted on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import ModelLoadError

# Rows up to which a CPU layer uses keel's matmul (keel/kernels/cpu_gemm.c, see _use_own); more rows go
# to F.linear (MKL). Up to here keel's kernel is at least as fast as oneDNN and MKL and is
# batch-invariant; past it MKL's large-batch blocking wins (bench/cpu_kernels.py,
# bench/results/cpu_kernels.md).
OWN_F32_MAX_ROWS = 256
# bfloat16 weights (of a bf16 model on a CPU without bf16 matmuls, or kept in bf16 under a float32
# model): keel's kernel reads them as bf16 and computes in float32, each panel widened once in L1, where
# bf16 F.linear has no fast path on such CPUs (bench/results/cpu_kernels.md). More rows widen the whole
# weight for MKL.
OWN_BF16_MAX_ROWS = 256
# Batch invariance without keel's kernels: F.linear (MKL / oneDNN) picks its blocking, and with it the
# order of each dot product's sums, from the row count. Fed blocks of exactly FIXED_ROWS rows (the last
# one padded with zeros), every row sees one blocking whatever its batch holds.
FIXED_ROWS = 16


def in_fixed_rows(fn, x: torch.Tensor, rows: int = FIXED_ROWS) -> torch.Tensor:
    """fn(x) computed on blocks of exactly `rows` rows of x (the last padded with zeros)."""
    t = x.shape[0]
    pad = -t % rows
    if pad:
        x = torch.cat((x, x.new_zeros(pad, x.shape[1])))
    y = torch.cat([fn(block) for block in x.split(rows)]) if x.shape[0] > rows else fn(x)
    return y[:t] if pad else y


def fixed_rows_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rows: int = FIXED_ROWS) -> torch.Tensor:
    return in_fixed_rows(lambda block: F.linear(block, w, bias), x, rows)


def keeps_bf16(param: torch.Tensor, weight_dtype: str | None) -> bool:
    """Is a float32 model's weight to be held in bfloat16? weight_dtype "bfloat16": yes (rounded);
    "auto": where the checkpoint stored it in bfloat16, so that nothing is rounded; else no."""
    if param.dtype != torch.float32 or weight_dtype not in ("auto", "bfloat16"):
        return False
    return weight_dtype == "bfloat16" or getattr(param, "checkpoint_dtypes", None) == {torch.bfloat16}

if TYPE_CHECKING:
    from keel.lora.layers import LinearLoRA, LoRAMetadata


class Linear(nn.Module):
    """y = x Wᵀ + b, optionally several checkpoint projections fused along the output dimension.

    output_sizes: for a fused layer, checkpoint shard name -> rows (e.g. {"q": 576, "k": 192, "v": 192});
    None for a plain layer.
    """

    def __init__(self, in_features: int, out_features: int | dict[str, int], bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.output_sizes = dict(out_features) if isinstance(out_features, dict) else None
        out = sum(self.output_sizes.values()) if self.output_sizes else int(out_features)
        self.in_features, self.out_features = in_features, out
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.weight.weight_loader = self.load_weight
        if self.bias is not None:
            self.bias.weight_loader = self.load_bias

    def shard_slice(self, shard: str | None) -> slice:
        if shard is None or self.output_sizes is None:
            return slice(0, self.out_features)
        start = 0
        for name, size in self.output_sizes.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None, what: str) -> None:
        dst = param.data[self.shard_slice(shard)]
        if tuple(dst.shape) != tuple(loaded.shape):
            raise ModelLoadError(f"{what} shard {shard or ''} has shape {tuple(loaded.shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
        dst.copy_(loaded)

    def load_weight(self, param, loaded, shard=None):
        self._load(param, loaded, shard, "weight")

    def load_bias(self, param, loaded, shard=None):
        self._load(param, loaded, shard, "bias")

    def forward(self, x: torch.Tensor, lora: "LoRAMetadata | None" = None) -> torch.Tensor:
        if lora is not None and self.lora is not None and self.lora.merges(self):
            return self.lora.linear(self, x)  # LoRA training (keel.finetune.lora): base and update in one op
        y = self.base_forward(x)
        if lora is not None and self.lora is not None:
            # Adapters add on top of whatever the base computes (dense, packed or quantized), never
            # merged into the weight: one base pass serves the tokens of every adapter and none.
            self.lora.apply(x, y, lora)
        return y

    lora: "LinearLoRA | None" = None  # resident adapters' weights for this layer (keel.lora.manager sets it)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own is not None:
            if x.shape[0] <= self.own_max_rows:
                y = self.own.gemm(x.float().contiguous(), self.own_fmt, self.weight)
                y = y if x.dtype == torch.float32 else y.to(x.dtype)
                return y if self.bias is None else y.add_(self.bias)
            y = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
            return y.to(x.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.fixed_rows:
            return fixed_rows_linear(x, self.weight, self.bias, self.fixed_rows)
        return F.linear(x, self.weight, self.bias)

    packed: torch.Tensor | None = None
    fixed_rows = 0  # F.linear on blocks of exactly this many rows (batch-invariant without keel's kernels)
    own = None  # keel.kernels.cpu.CPUKernels, where keel's matmul serves this layer (see _use_own)
    own_fmt = 0
    own_max_rows = 0

    backend = None  # keel.kernels.backend.Backend, set by the model's prepare(); None: the default one

    def pack_for_cpu(self, weight_dtype: str | None = None) -> bool:
        """Choose this layer's CPU matmul once: keel's own (see _use_own), else, where the backend is not
        batch-invariant, the weight reordered into oneDNN's blocked layout (the dense copy dropped), else
        F.linear. weight_dtype "auto" or "bfloat16": a float32 layer may hold its weight in bfloat16 for
        keel's kernel (see keeps_bf16).

        oneDNN's packed layout beats F.linear (MKL) on projections and the output head alike
        (bench/kernels.py, bench/results/kernels.md). Neither is batch-invariant (their blocking depends on the row count), so a batch-invariant backend without
        keel's kernels keeps F.linear, fed a fixed number of rows at a time (see _fixed_rows).
        """
        from keel.kernels.backend import of
        backend = of(self)
        kind = f"linear.{str(self.weight.dtype).removeprefix('torch.')}"
        if self.weight.device.type != "cpu":
            backend.record(kind, "torch F.linear")
            return False
        if keeps_bf16(self.weight, weight_dtype) and self._use_own(store_bf16=True):
            backend.record("linear.bfloat16", f"keel {backend.isa}")
            return True
        if self._use_own():
            backend.record(kind, f"keel {backend.isa}")
            return True
        if backend.batch_invariant:
            self.fixed_rows = FIXED_ROWS
            backend.record(kind, f"torch F.linear ({FIXED_ROWS}-row blocks)")
            return False
        if not torch.backends.mkldnn.is_available():
            backend.record(kind, "torch F.linear")
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 16)
            x = torch.randn(3, self.in_features, dtype=self.weight.dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            want = F.linear(x, self.weight, self.bias)
            if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3 * float(want.abs().max()) + 1e-6):
                raise RuntimeError("oneDNN's packed matmul disagrees with F.linear")
        except (RuntimeError, AttributeError):  # op missing, or dtype not supported on this CPU
            backend.record(kind, "torch F.linear")
            return False
        self.packed = packed
        self.weight_bytes_packed = self.weight.numel() * self.weight.element_size()
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)
        backend.record(kind, "oneDNN packed")
        return True

    def _use_own(self, store_bf16: bool = False) -> bool:
        """keel's matmul (float32 arithmetic, the weight read as stored: float32 or bfloat16) where the
        backend has keel's CPU kernels. It serves up to OWN_*_MAX_ROWS rows, or every row count where the
        backend is batch-invariant; F.linear above. store_bf16: a float32 layer's weight is held in
        bfloat16 from here on. Checked on a probe against F.linear before it is used."""
        from keel.kernels.backend import of
        from keel.kernels.cpu import W_BF16, W_F32
        backend = of(self)
        own = backend.cpu_kernels()
        if own is None or self.in_features % 8:
            return False
        if store_bf16:
            fmt, rows = W_BF16, OWN_BF16_MAX_ROWS
        elif self.weight.dtype == torch.float32:
            fmt, rows = W_F32, OWN_F32_MAX_ROWS
        elif self.weight.dtype == torch.bfloat16:
            fmt, rows = W_BF16, OWN_BF16_MAX_ROWS
        else:
            return False
        w = self.weight.data.to(torch.bfloat16) if store_bf16 else self.weight.data.contiguous()
        x = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0))
        want = x @ w.float().t()
        if not torch.allclose(own.gemm(x, fmt, w), want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            return False
        self.weight.data, self.own, self.own_fmt, self.own_max_rows = w.contiguous(), own, fmt, backend.max_rows(rows)
        if self.bias is not None and store_bf16:
            self.bias.data = self.bias.data.float()
        return True

    def gemm_args(self):
        """(fmt, weight, scale, zero, group, max rows) of keel's matmul where it serves this layer, for
        callers that run it themselves (keel/models/fused_decode.py); None where it does not."""
        if self.own is None:
            return None
        return self.own_fmt, self.weight, None, None, 0, self.own_max_rows

    def weight_bytes(self) -> int:
        if self.packed is not None:
            return self.weight_bytes_packed
        return self.weight.numel() * self.weight.element_size()
