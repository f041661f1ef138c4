"""Decode steps through the Llama decoder in one C call (keel/kernels/cpu_stack.c).

A decode step at batch 1 does little arithmetic per layer, so the ~11 Python-level calls per layer
(norms, matmuls, rotary and cache write, attention, activation, residual adds, each with its tensor
allocations) cost about as much as the matmuls themselves (bench/profile_decode.py). Where every part of every layer runs on keel's CPU kernels anyway (float32 on an AVX2
CPU: dense, GGUF-block or keel-quantized projections, the float32 paged cache), the whole stack runs as
one call of the same kernels in the same order, with the same results bit for bit; LoRA adapters' updates
too, through the batched LoRA kernel, where every slot of the step has at most KERNEL_MAX_ROWS tokens.
Anything else (prefill chunks, Qwen3's q/k norms, bfloat16, GPUs) takes the module path.

The stack is built once the weights, adapter stacks and caches are final (ModelRunner), from raw
addresses. It holds a reference to every tensor and table it points at, so none can be freed under it,
and before each call checks that each of them still sits where it did (a cache reallocated, a layer's
weight or adapter stack replaced): if anything moved, it is rebuilt; where that fails, steps take the
module path.
"""

from __future__ import annotations

import torch

from keel.layers.attention import AttentionMetadata
from keel.lora.layers import LoRAMetadata


def _address(t) -> int:
    return t.data_ptr() if isinstance(t, torch.Tensor) else id(t)


def _home(owner, name):
    """Where owner.name lives: a module's parameter or buffer dict, an object's __dict__, or a list."""
    if isinstance(owner, list):
        return owner
    for d in (getattr(owner, "_parameters", None), getattr(owner, "_buffers", None), getattr(owner, "_modules", None)):
        if d is not None and name in d:
            return d
    return owner.__dict__


class DecodeStack:
    def __init__(self, model, own, layers, dims: tuple, max_rows: int, eps: float, scale: float, loras: list,
                 lora_ok: bool, held: list, backend=None) -> None:
        self.model, self.own, self.layers, self.dims = model, own, layers, dims
        self.max_rows, self.eps, self.scale = max_rows, eps, scale
        self.loras, self.lora_ok = loras, lora_ok  # the LinearLoRA layers; all on keel's kernel
        self.h_cols = max((lo.a.shape[1] for lo in loras), default=0)
        self.held = held  # (owner, attribute, tensor) of everything the structs point at, kept alive
        # (the dict or list the attribute lives in, its key, the object, its address): read directly, since
        # nn.Module.__getattr__ is slow (a dict walk per call) and this runs before every decode step
        checks = [(_home(owner, name), name, t) for owner, name, t in held]
        self.tensor_checks = [(h, k, t, t.data_ptr()) for h, k, t in checks
                              if isinstance(t, torch.Tensor) and not isinstance(h, list)]
        self.other_checks = [(h, k, t) for h, k, t in checks if not isinstance(t, torch.Tensor) or isinstance(h, list)]
        self.backend = backend

    def moved(self) -> bool:
        """Has any tensor the stack points at been replaced or reallocated since it was built?"""
        for home, key, t, ptr in self.tensor_checks:
            now = home.get(key)
            if now is not t or t.data_ptr() != ptr:
                return True
        for home, key, o in self.other_checks:  # adapter stacks in lists, adapter objects: by identity
            if (home[key] if isinstance(home, list) else home.get(key)) is not o:
                return True
        return False

    @classmethod
    def build(cls, model, backend=None) -> "DecodeStack | None":
        """The stack of `model` (a LlamaForCausalLM, its caches allocated), or None where some part of it
        does not run on keel's CPU kernels."""
        from keel.kernels.backend import of
        from keel.kernels.cpu import Layer, lin
        from keel.models.llama import MLP, Attention, DecoderLayer
        backend = backend or of(model)
        own = backend.cpu_kernels()
        layers = list(model.model.layers)
        if own is None or not layers or getattr(model, "rotary", None) is None or model.rotary.partial:
            return None
        structs, max_rows, loras, lora_ok, held = [], 1 << 62, [], True, []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            if (type(layer).forward is not DecoderLayer.forward or not isinstance(attn, Attention) or attn.qk_norm
                    or type(attn).forward is not Attention.forward or not isinstance(mlp, MLP)
                    or type(mlp).forward is not MLP.forward or attn.attn.own is None
                    or mlp.act_name not in ("silu", "swish")):
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
                return None
            held += [(layer.input_layernorm, "weight", norms[0]), (layer.post_attention_layernorm, "weight", norms[1]),
                     (attn.attn, "k_cache", attn.attn.k_cache), (attn.attn, "v_cache", attn.attn.v_cache)]
            lins = []
            for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                args = proj.gemm_args()
                bias = proj.bias
                if args is None or (bias is not None and bias.dtype != torch.float32):
                    return None
                fmt, w, scale, zero, group, rows = args
                max_rows = min(max_rows, rows)
                for name in ("weight", "qweight", "scales", "zeros", "bias"):
                    t = getattr(proj, name, None)
                    if isinstance(t, torch.Tensor) and t.numel():
                        held.append((proj, name, t))
                lora = proj.lora
                if lora is not None and lora.kernel is None:
                    lora_ok, lora = False, None  # adapters there, but not on keel's kernel: steps with them go by module
                if lora is not None:
                    loras.append(lora)
                    held += [(proj, "lora", lora), (lora, "a", lora.a), (lora, "_rank_table", lora._rank_table),
                             (lora, "_scale_table", lora._scale_table)]
                    held += [(lora.b, k, b) for k, b in enumerate(lora.b)]
                lins.append(lin(fmt, w, scale, zero, group, bias, lora))
            structs.append(Layer(norms[0].data_ptr(), norms[1].data_ptr(), attn.attn.k_cache.data_ptr(),
                                 attn.attn.v_cache.data_ptr(), *lins))
        first = layers[0]
        a = first.self_attn
        dims = (model.config.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, first.mlp.inter)
        array = (Layer * len(structs))(*structs)
        return cls(model, own, array, dims, max_rows, first.input_layernorm.eps, a.attn.scale, loras, lora_ok, held,
                   backend)

    def runs(self, x: torch.Tensor, meta: AttentionMetadata, lora: LoRAMetadata | None = None) -> bool:
        if lora is not None and not (self.lora_ok and lora.kernel_slots is not None and not lora.kernel_rest
                                     and not any(lo.pad_ranks for lo in self.loras)):
            return False
        if not (meta.max_query_len == 1 and meta.context_lens is not None and x.dtype == torch.float32
                and x.device.type == "cpu" and x.shape[0] <= self.max_rows):
            return False
        if self.moved():  # rebuilt over the tensors as they are now; the module path if it cannot be
            self.model.decode_stack = DecodeStack.build(self.model, self.backend) or False
            return bool(self.model.decode_stack) and self.model.decode_stack is not self and \
                self.model.decode_stack.runs(x, meta, lora)
        return True

    def run(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
            lora: LoRAMetadata | None = None) -> torch.Tensor:
        """x [T, hidden] -> the hidden states after every layer (x itself, updated in place)."""
        from keel.kernels.cpu import LoraStep
        x = x.contiguous()
        cos, sin = rope[0].contiguous(), rope[1].contiguous()
        step = None
        if lora is not None:
            slots, starts, counts = lora.kernel_slots
            h = torch.empty(x.shape[0], self.h_cols, dtype=torch.float32)  # alive through the call
            step = LoraStep(slots.data_ptr(), starts.data_ptr(), counts.data_ptr(), slots.numel(), h.data_ptr())
        self.own.decode_stack(self.layers, x, self.dims, self.eps, self.scale, cos, sin, meta.slot_mapping,
                              meta.gather_blocks, meta.context_lens, meta.block_size, step)
        return x
