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
