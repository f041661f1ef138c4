"""What Int8Linear and Int4Linear share: the dense Linear's interface over quantized tensors.

A quantized layer is built empty, like Linear, and filled through per-shard weight loaders, so fused
q/k/v and gate/up layers load (and quantize) each checkpoint projection on its own. It holds its
tensors in a portable "checkpoint" format (what `keel quantize` writes) until `prepare()`, which
moves them into the layout of the fastest kernel this device has, after checking that kernel on a
probe against the pure-torch reference; where none passes, the reference (dequantize, then matmul)
is used. `pack_for_cpu()`, which the engine calls on every Linear on a CPU, is `prepare()` here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import ModelLoadError
from keel.layers.linear import FIXED_ROWS, Linear, fixed_rows_linear, in_fixed_rows


class QuantLinear(Linear):
    method = ""

    def __init__(self, in_features: int, out_features: int | dict[str, int], bias: bool = False,
                 dtype: torch.dtype | None = None, device=None, *, group_size: int | None = None,
                 name: str = "") -> None:
        nn.Module.__init__(self)  # not Linear.__init__: no full-precision weight, ever
        self.output_sizes = dict(out_features) if isinstance(out_features, dict) else None
        out = sum(self.output_sizes.values()) if self.output_sizes else int(out_features)
        self.in_features, self.out_features, self.group_size, self.name = in_features, out, group_size, name
        self.dtype = dtype or torch.get_default_dtype()
        for tname, (shape, tdtype) in self.tensor_specs().items():
            # zeros, not empty: a layer short of a shard must not compute on garbage before the
            # loader's completeness check reports it
            p = nn.Parameter(torch.zeros(shape, dtype=tdtype, device=device), requires_grad=False)
            p.weight_loader = self._load_quantized
            self.register_parameter(tname, p)
        self.bias = (nn.Parameter(torch.zeros(out, dtype=self.dtype, device=device), requires_grad=False)
                     if bias else None)
        if self.bias is not None:
            self.bias.weight_loader = self.load_bias
        self.fast = None  # None: not prepared; False: no fast kernel here; else x -> x Wᵀ
        self.fast_max_rows = 0  # more rows than this go through dequantize-then-matmul
        self.kernel = "reference"

    # -- the format ------------------------------------------------------------------------
    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint tensors of this layer: name -> (shape, dtype)."""
        raise NotImplementedError

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int | None) -> dict[str, torch.Tensor]:
        """A float weight [rows, in] -> this format's tensors (the reference quantizer)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] the layer computes with, in `dtype` (default: the model dtype)."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized rows `ids` of the weight, [len(ids), in] in `dtype` (default: the model dtype)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.method if self.group_size is None else f"{self.method} with group size {self.group_size}"

    # -- loading ---------------------------------------------------------------------------
    def _load_quantized(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        if self.fast is not None:
            raise RuntimeError(f"{self.name}: weights loaded after prepare()")
        tname = next(n for n, p in self._parameters.items() if p is param)
        dst = param.data[self.shard_slice(shard)]
        if loaded.dtype != dst.dtype or tuple(loaded.shape) != tuple(dst.shape):
            what = f"{self.name}.{tname}" + (f" (shard {shard})" if shard else "")
            raise ModelLoadError(
                f"{what}: the checkpoint has {str(loaded.dtype).replace('torch.', '')} {tuple(loaded.shape)}, "
                f"but {self.describe()} needs {str(dst.dtype).replace('torch.', '')} {tuple(dst.shape)}: "
                "the quantization config does not match the tensors")
        dst.copy_(loaded)

    # -- compute ---------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] in the model dtype -> [T, out]; Linear.forward adds LoRA adapters on top
        if self.fast is None:
            self.prepare()
        if self.fast is not False and x.shape[0] <= self.fast_max_rows:
            y = self.fast(x) if not self.fixed_rows else in_fixed_rows(self.fast, x, self.fixed_rows)
            return y if self.bias is None else y.add_(self.bias)
        if self.fixed_rows:
            return fixed_rows_linear(x, self.dequantize(x.dtype), self.bias, self.fixed_rows)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def prepared(self) -> None:
        """After prepare(): record the choice, and where keel's own matmul does not serve this layer on a
        batch-invariant backend, feed the kernel fixed-size row blocks (see keel.layers.linear.FIXED_ROWS)."""
        from keel.kernels.backend import UNLIMITED, of
        backend = of(self)
        if backend.batch_invariant:
            if self._gemm is None:
                self.fixed_rows = FIXED_ROWS
                if self.fast is not False:
                    self.fast_max_rows = UNLIMITED
            else:  # keel's matmul for every row count: the same arithmetic for a row whatever its batch
                self.fast_max_rows = UNLIMITED
                self._gemm = self._gemm[:5] + (UNLIMITED,)
                self.own_all_rows = True
        backend.record(f"linear.{self.method}", self.kernel + (f" ({FIXED_ROWS}-row blocks)" if self.fixed_rows else ""))

    def prepare(self) -> None:
        """Choose the kernel for this device and dtype and move the tensors into its layout."""
        self.fast = False

    own_all_rows = False  # keel's matmul serves every row count (a batch-invariant backend)
    _gemm = None  # Linear.gemm_args' answer, where keel's CPU matmul is this layer's kernel

    def gemm_args(self):
        if self.fast is None:
            self.prepare()
        return self._gemm

    def pack_for_cpu(self, weight_dtype: str | None = None) -> bool:
        if self.fast is None:  # prepare() moves tensors into a kernel's layout: once
            self.prepare()
            self.prepared()
        return self.fast is not False

    def check_fast(self, fast) -> bool:
        """Does `fast` agree with the reference on a probe, to within bf16 rounding? A kernel missing from
        this build, refusing these shapes or computing something else is not used. Checked on the first
        and last 64 output rows and 64 more at random: enough to catch a wrong layout, cheap at load."""
        try:
            ids = sample_rows(self.out_features)
            w = self.rows(ids, torch.float32)
            probe = torch.Generator().manual_seed(0)  # not the global generator: loading must not move it
            x = torch.randn(3, self.in_features, generator=probe).to(device=w.device, dtype=self.dtype)
            want = x.float() @ w.t()
            got = fast(x).float()
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            return False
        if got.shape != (3, self.out_features):
            return False
        bound = 2 ** -6 * (x.float().abs() @ w.abs().t()) + 1e-6  # a few bf16 ulps of the magnitude
        return bool(((got[:, ids] - want).abs() <= bound).all())

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight as now resident (bias not included, as for Linear)."""
        return sum(t.numel() * t.element_size() for t in self.resident_tensors())

    def resident_tensors(self) -> list[torch.Tensor]:
        return [p for n, p in self._parameters.items() if n != "bias" and p is not None]


def sample_rows(n: int, k: int = 64) -> torch.Tensor:
    """Row indices to check a layout or kernel on: the first and last k rows and k in between."""
    if n <= 3 * k:
        return torch.arange(n)
    between = torch.randint(k, n - k, (k,), generator=torch.Generator().manual_seed(n))
    return torch.cat((torch.arange(k), between, torch.arange(n - k, n))).unique()


class QuantEmbedding:
    """Mixin: a token embedding over a quantized table ([vocab, hidden], one row per token). Lookups
    dequantize the rows they need; a tied output head (TiedQuantHead) runs the layer's matmul on the
    same tensors."""

    serves_head = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def prepare(self) -> None:
        if self.serves_head:
            super().prepare()  # the matmul layout, from which rows() also reads
        else:
            self.fast = False  # lookups only: the portable layout is the one rows() reads best


class TiedQuantHead(nn.Module):
    """The output head of a model with tied embeddings, computing with the quantized embedding's
    tensors. It registers no parameters of its own, so the weights are held (and loaded) once."""

    def __init__(self, embedding: QuantEmbedding) -> None:
        super().__init__()
        embedding.serves_head = True
        self._embedding = [embedding]  # in a list: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].linear(x)

    def weight_bytes(self) -> int:
        return 0
