"""LoRA layers in training mode, on keel's own model code, saved in the PEFT format the server loads.

Each adapted keel `Linear` gets a `TrainableLoRA` as its `lora`: for every adapted output shard (q, k,
v of a fused qkv_proj; gate, up of gate_up_proj) a rank-r pair A [r, in], B [out_k, r], initialised as
PEFT does (A Kaiming-uniform, B zero, so training starts from the base model). One matmul shrinks x for
every shard of a fused layer at once. The update is computed in float32 whatever the base dtype, and
the adapter is written with PEFT's tensor names (`base_model.model.<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained` and keel's server read the same file.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import InvalidRequestError
from keel.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, BaseTargets

DEFAULT_TARGETS = ("all-linear",)


class Training:
    """The `lora` argument a training forward passes down to every projection (see Linear.forward)."""


TRAINING = Training()


class TrainableLoRA(nn.Module):
    def __init__(self, in_features: int, shard_sizes: list[int], adapted: dict[int, str], r: int, alpha: float,
                 dropout: float, generator: torch.Generator, device) -> None:
        """adapted: shard index -> the PEFT module name of that projection."""
        super().__init__()
        self.shard_sizes, self.r, self.scale = shard_sizes, r, alpha / r
        self.names = dict(adapted)
        self.order = sorted(adapted)  # shard indices with an adapter, in output order
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for _ in self.order:
            a = torch.empty(r, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.A.append(nn.Parameter(a.to(device)))
            self.B.append(nn.Parameter(torch.zeros(shard_sizes[_], r, device=device)))
        self.dropout = dropout

    def slices(self) -> list[slice]:
        """Output rows of each adapted shard, in self.order."""
        starts = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]
        return [slice(starts[i], starts[i] + self.shard_sizes[i]) for i in self.order]

    def merges(self, linear) -> bool:
        """Base and update in one op (see MergedLoRALinear): float32 weights and no dropout (dropout
        feeds the update another input than the base)."""
        return linear.weight.dtype == torch.float32 and not self.dropout

    def linear(self, linear, x: torch.Tensor) -> torch.Tensor:
        """The training forward of a Linear with this adapter: y = x (W + s B A)ᵀ + b."""
        params = [t for k in range(len(self.order)) for t in (self.A[k], self.B[k])]
        return MergedLoRALinear.apply(x, linear.weight, linear.bias, self.scale, self.slices(), *params)

    def apply(self, x: torch.Tensor, y: torch.Tensor, meta) -> None:
        # x: [T, in]; y: [T, out] (the base output, updated in place)
        xf = x.float()
        if self.dropout and torch.is_grad_enabled():  # training steps only, not validation
            xf = F.dropout(xf, self.dropout, True)
        a = self.A[0] if len(self.A) == 1 else torch.cat(list(self.A))
        h = xf @ a.t()  # [T, r * adapted shards]: one shrink for every shard
        parts, k = [], 0
        for i, size in enumerate(self.shard_sizes):
            if i in self.names:
                parts.append(h[:, k * self.r:(k + 1) * self.r] @ self.B[k].t())
                k += 1
            else:
                parts.append(h.new_zeros(h.shape[0], size))
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        y.add_((delta * self.scale).to(y.dtype))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, i in enumerate(self.order):
            name = self.names[i]
            out[f"base_model.model.{name}.lora_A.weight"] = self.A[k].detach().float().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = self.B[k].detach().float().cpu().contiguous()
        return out


def _merged(weight: torch.Tensor, slices: list[slice], ab, scale: float) -> torch.Tensor:
    w = weight.clone()
    for k, sl in enumerate(slices):
        w[sl].addmm_(ab[2 * k + 1], ab[2 * k], alpha=scale)  # W_k + s B_k A_k
    return w


class MergedLoRALinear(torch.autograd.Function):
    """y = x (W + s B A)ᵀ + b with gradients for A and B only, the products PEFT's layer computes in fewer,
    larger operations. Forward and input gradient each use one matmul with the merged weight (rebuilt
    in the backward pass, not kept: out x in x r multiply-adds, small beside a step's T x out x in)
    instead of the base matmul plus thin [T, r] x [r, out] ones and the adds between them; the LoRA
    gradients need x Aᵀ and dY B, one thin matmul each. Exact in float32 up to rounding order."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, slices, *ab):
        ctx.scale, ctx.slices = scale, slices
        ctx.save_for_backward(x, weight, *ab)
        return F.linear(x, _merged(weight, slices, ab, scale), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, *ab = ctx.saved_tensors
        scale, slices = ctx.scale, ctx.slices
        dx = dy @ _merged(weight, slices, ab, scale) if ctx.needs_input_grad[0] else None
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        a_all = ab[0] if len(slices) == 1 else torch.cat(ab[0::2])
        h = x2 @ a_all.t()  # [T, r * shards]: one shrink for every shard
        grads = []
        for k, sl in enumerate(slices):
            a, b = ab[2 * k], ab[2 * k + 1]
            r = a.shape[0]
            dyk = dy2[:, sl]
            grads.append((dyk @ b).t() @ x2 * scale)  # dA_k = s (dY_k B_k)ᵀ x
            grads.append(dyk.t() @ h[:, k * r:(k + 1) * r] * scale)  # dB_k = s dY_kᵀ (x A_kᵀ)
        return (dx, None, None, None, None, *grads)


def attach(model: nn.Module, r: int, alpha: float, dropout: float, targets, seed: int) -> list[TrainableLoRA]:
    """Give the projections named in `targets` (short names such as q_proj, or "all-linear") trainable
    LoRA pairs; every base weight stays frozen. Returns the new layers in model order."""
    from keel.layers.linear import Linear
    base = BaseTargets(model)
    wanted = set(base.short_names) if targets in ("all-linear", ["all-linear"]) else set(targets)
    unknown = wanted - set(base.short_names)
    if unknown:
        raise InvalidRequestError(f"lora target_modules {sorted(unknown)} are not projections of this model "
                                  f"(it has {', '.join(base.short_names)})", param="lora.target_modules")
    by_module: dict[str, dict[int, str]] = {}
    for name, t in base.targets.items():
        if name.rsplit(".", 1)[1] in wanted:
            by_module.setdefault(t.module, {})[t.shard] = name
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for path, mod in model.named_modules():
        if isinstance(mod, Linear) and path in by_module:
            sizes = list(mod.output_sizes.values()) if mod.output_sizes else [mod.out_features]
            layer = TrainableLoRA(mod.in_features, sizes, by_module[path], r, alpha, dropout, gen, mod.weight.device)
            # a plain attribute, not a submodule: Linear's class attribute `lora` would shadow a registered
            # one, and the trainer holds the layers itself
            object.__setattr__(mod, "lora", layer)
            layers.append(layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(True)
    return layers


def save_peft(layers: list[TrainableLoRA], folder: str, r: int, alpha: float, dropout: float, targets: list[str],
              base_model: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors (written to temporary names, then renamed:
    a reader never sees half an adapter)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for layer in layers:
        tensors.update(layer.peft_tensors())
    if "all-linear" in targets:  # written as the projections it resolved to: PEFT and keel read them alike
        targets = {name.rsplit(".", 1)[1] for layer in layers for name in layer.names.values()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": base_model}
    tmp = os.path.join(folder, WEIGHTS_FILE + ".part")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE + ".part"), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(folder, CONFIG_FILE + ".part"), os.path.join(folder, CONFIG_FILE))
