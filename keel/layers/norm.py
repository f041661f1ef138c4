"""RMSNorm. On x86 CPUs keel's kernel (keel/kernels) normalises float32 rows in one pass: F.rms_norm
on CPU runs as five separate ops (pow, mean, add, rsqrt, mul), each with its own allocation and pass
over the row, twice per layer and once more per step (bench/profile_decode.py)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    own = None  # keel.kernels.cpu.CPUKernels once checked (False: not used)
    backend = None  # keel.kernels.backend.Backend, set by the model's prepare()

    def prepare(self) -> None:
        """Choose the kernel once (the model calls this when the engine is built)."""
        self.own = self._own_kernel()
        from keel.kernels.backend import of
        of(self).record("rms_norm", f"keel {self.own.isa}" if self.own else "torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self.own is None:
                self.own = self._own_kernel()
            if self.own and x.is_contiguous():
                return self.own.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 as the reference implementations do, then scale in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def _own_kernel(self):
        from keel.kernels.backend import of
        own = of(self).cpu_kernels() if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 else None
        if own is None:
            return False
        probe = torch.randn(2, self.weight.shape[0], generator=torch.Generator().manual_seed(0))
        want = F.rms_norm(probe, self.weight.shape, self.weight, self.eps)
        return own if torch.allclose(own.rms_norm(probe, self.weight, self.eps), want, rtol=1e-5, atol=1e-6) else False


class OffsetRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint stores weight - 1 (Gemma): the scale is 1 + weight, kept and applied in
    float32 whatever the model dtype, as the reference computes it, so no weight is rounded."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None) -> None:
        super().__init__(dim, eps, torch.float32, device)
        self.weight.weight_loader = self._load

    @staticmethod
    def _load(param, loaded, shard=None) -> None:
        from keel.errors import ModelLoadError
        if tuple(param.shape) != tuple(loaded.shape):
            raise ModelLoadError(f"a norm weight has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
        param.data.copy_(loaded.float() + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm, with or without a bias (Falcon, MPT)."""

    def __init__(self, dim: int, eps: float, bias: bool = True, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
