"""One LoRA adapter in the PEFT format: adapter_config.json + adapter_model.safetensors.

Reading happens in two stages so that validation is cheap and never waits on the weights:
`read_spec` parses the config and the safetensors header (names, shapes, no data) and checks everything
that can make an adapter wrong for this base model; `load_weights` reads the tensors later, on a
background thread. Unsupported features are refused here with the reason, never ignored: an adapter
that loads always gives the output PEFT would.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from keel.errors import LoRAError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes a few KB; a config this large is not an adapter's
# An adapter name is what clients send as `model` and what logs and /v1/models show: ASCII letters,
# digits and ._-:@+= , with / between parts as in hub ids (org/name), at most 128 characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-:@+=]*(/[A-Za-z0-9][A-Za-z0-9._\-:@+=]*)*")
MAX_NAME_LEN = 128


def check_adapter_name(name) -> None:
    """LoRAError unless `name` is a valid adapter name (see _NAME)."""
    if not isinstance(name, str) or not name:
        raise LoRAError("an adapter name must be a non-empty string")
    if len(name) > MAX_NAME_LEN:
        raise LoRAError(f"adapter name is {len(name)} characters long; at most {MAX_NAME_LEN} are allowed")
    if not name.isascii() or _NAME.fullmatch(name) is None or ".." in name:
        raise LoRAError(f"adapter name {name!a} is invalid: use letters, digits and . _ - : @ + =, with / "
                        f"between parts (org/name), starting each part with a letter or digit, and no '..'")
# lora_A / lora_B weights of a module, with or without the adapter name PEFT strips when saving
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_UNSUPPORTED_TENSORS = {
    "lora_magnitude_vector": "DoRA (use_dora) is not supported",
    "lora_embedding_": "LoRA on the token embedding is not supported",
    "lora_A.bias": "LoRA biases (lora_bias) are not supported",
    "lora_B.bias": "LoRA biases (lora_bias) are not supported",
}
# Settings that change what the adapter computes and that keel does not implement: each must be off.
_MUST_BE_OFF = {
    "use_dora": "DoRA (use_dora) is not supported",
    "bias": "bias={!r}: trained biases are not supported (only bias='none')",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "modules_to_save": "modules_to_save={!r}: fully trained extra modules are not supported",
    "trainable_token_indices": "trainable_token_indices: trained token embeddings are not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
}
_EMBEDDING_OR_HEAD = ("embed_tokens", "lm_head", "tied_head")


@dataclass(frozen=True)
class Target:
    """A projection of the base model, under its Hugging Face name, that an adapter may adapt."""
    module: str  # our Linear's path, e.g. "model.layers.0.self_attn.qkv_proj"
    shard: int  # index of this projection among that Linear's fused outputs (0 for a plain Linear)
    in_features: int
    out_features: int  # rows of this projection alone


class BaseTargets:
    """The projections of one base model an adapter can target, named as PEFT names them
    ("model.layers.0.self_attn.q_proj"), and the names of everything else (for error messages)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from keel.layers.linear import Linear
        by_fused: dict[tuple[str, str], str] = {v: k for k, v in model.packed_modules.items()}
        self.targets: dict[str, Target] = {}
        self.other: set[str] = set()
        # the decoder layers' projections: under model.layers in Llama's layout, elsewhere where the family
        # keeps them (Falcon's transformer.h., MPT's transformer.blocks.)
        prefix = getattr(model, "layers_prefix", None)
        # A module with a `lora_unsupported` reason (a mixture-of-experts block, keel/layers/moe.py) keeps
        # every projection under it out of the targets: Hugging Face name -> the reason, for the error.
        self.unsupported: dict[str, str] = {}
        refused: dict[str, str] = {}  # "path." of each such module -> its reason
        for name, mod in model.named_modules():
            if getattr(mod, "lora_unsupported", None):
                refused[name + "."] = mod.lora_unsupported
            why = next((r for p, r in refused.items() if (name + ".").startswith(p)), None)
            if isinstance(mod, Linear) and (name.startswith(prefix) if prefix else ".layers." in name):
                parent, attr = name.rsplit(".", 1)
                # a plain layer is named as the checkpoint names it (Mixtral's w2 is an expert's down_proj)
                shards = mod.output_sizes.items() if mod.output_sizes else [(None, mod.out_features)]
                for i, (shard, size) in enumerate(shards):
                    hf = f"{parent}.{by_fused[(attr, shard)] if shard else by_fused.get((attr, None), attr)}"
                    if why:
                        self.unsupported[hf] = why
                        self.other.add(hf)
                    else:
                        self.targets[hf] = Target(name, i, mod.in_features, size)
            elif name:
                self.other.add(name)
                if why:
                    self.unsupported[name] = why
        self.other.add("lm_head")
        self.other.discard("tied_head")
        self.short_names = sorted({n.rsplit(".", 1)[1] for n in self.targets})

    def module_names(self) -> list[str]:
        return list(self.targets) + sorted(self.other)


@dataclass
class AdapterSpec:
    """What a validated adapter adapts: per target projection its rank and scale. No weights."""
    name: str
    path: str
    weights_file: str
    ranks: dict[str, int]  # Hugging Face module name -> rank
    scales: dict[str, float]  # Hugging Face module name -> lora_alpha / r (or / sqrt(r) with use_rslora)
    tensor_names: dict[str, tuple[str, str]]  # module -> (lora_A tensor, lora_B tensor) in the file
    shapes: dict[str, tuple[tuple, tuple]]  # module -> (lora_A shape, lora_B shape) as validated
    base_model: str | None = None  # base_model_name_or_path as recorded
    max_rank: int = field(init=False)
    num_params: int = 0

    def __post_init__(self) -> None:
        self.max_rank = max(self.ranks.values())


def _fail(name: str, path: str, reason: str) -> LoRAError:
    return LoRAError(f"LoRA adapter {name!r} ({path}): {reason}")


def _regex(pattern: str, fail):
    """A config's regular expression compiled by RE2, whose matching time is linear in the text: a
    backtracking engine (Python's re) can spend hours on a pattern like (.|.)*X. RE2 has no
    backreferences or look-around; a pattern that uses them is refused."""
    import re2
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise fail(f"{pattern!r} is not a regular expression keel can match in linear time (RE2 syntax, no "
                   f"backreferences or look-around): {msg}") from None


def _pattern_value(patterns: dict, module: str, default, fail):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise fail(f"rank_pattern / alpha_pattern key {key!r} is not a string")
        if _regex(rf"(.*\.)?({key})$", fail).match(module):
            return value
    return default


def _targets_in_config(cfg: dict, base: BaseTargets, fail) -> None:
    """target_modules must name projections the base has, and no embedding or output head."""
    tm = cfg.get("target_modules")
    names = base.module_names()
    if tm is None or tm == "all-linear" or tm == ["all-linear"]:
        return
    if isinstance(tm, str):
        pattern = _regex(tm, fail)
        matched = [n for n in names if pattern.fullmatch(n)]
        bad = [n for n in matched if n not in base.targets]
        if bad:
            raise fail(_unsupported_target(bad[0], base=base))
        if not matched:
            raise fail(f"target_modules {tm!r} matches no module of the base model "
                       f"(its projections: {', '.join(base.short_names)})")
        return
    if not isinstance(tm, (list, tuple)) or not all(isinstance(t, str) for t in tm):
        raise fail(f"target_modules={tm!r} is not a list of module names or a regular expression")
    for t in tm:
        matched = [n for n in names if n == t or n.endswith("." + t)]
        bad = [n for n in matched if n not in base.targets]
        if bad:
            raise fail(_unsupported_target(bad[0], t, base))
        if not matched:
            raise fail(f"target module {t!r} is not in the base model (its projections: {', '.join(base.short_names)})")


def _unsupported_target(module: str, target: str | None = None, base: BaseTargets | None = None) -> str:
    what = target or module
    why = base.unsupported.get(module) if base is not None else None
    if why:
        return f"target {what!r}: {why}" + (f" ({module})" if target else "")
    if any(k in module for k in _EMBEDDING_OR_HEAD):
        return f"target {what!r}: LoRA on the token embedding or the output head is not supported"
    return f"target {what!r}: only the attention and MLP projections can be adapted, not {module}"


def _same_base(recorded: str, served: str) -> bool:
    """Lenient: the recorded base and the served model agree unless neither name contains the other
    (compared on the last path part, lower case, letters and digits only, GGUF quantization tag dropped)."""
    def norm(s: str) -> str:
        s = os.path.basename(s.rstrip("/\\")).lower()
        s = re.sub(r"\.gguf$", "", s)
        s = re.sub(r"[.-](q\d[\w]*|f16|f32|bf16|iq\d\w*)$", "", s)
        return re.sub(r"[^a-z0-9]", "", s)
    a, b = norm(recorded), norm(served)
    return not a or not b or a in b or b in a


def read_spec(name: str, path: str, base: BaseTargets, max_rank: int, served_model: str | None = None) -> AdapterSpec:
    """Parse and check an adapter folder without reading its weights. Raises LoRAError with the reason."""
    def fail(reason: str) -> LoRAError:
        return _fail(name, path, reason)

    if not path or not os.path.exists(path):
        raise fail("the path does not exist")
    if not os.path.isdir(path):
        raise fail("the path is not a folder (a PEFT adapter is a folder with adapter_config.json)")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise fail(f"{CONFIG_FILE} is missing: not a PEFT adapter folder")
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise fail(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        cfg = json.loads(raw)
    except (OSError, ValueError) as e:
        raise fail(f"{CONFIG_FILE} cannot be parsed: {e}") from None
    except RecursionError:
        raise fail(f"{CONFIG_FILE} nests too deeply to be an adapter config") from None
    if not isinstance(cfg, dict):
        raise fail(f"{CONFIG_FILE} is not a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise fail(f"peft_type={peft_type!r}: only LORA adapters are supported")
    for key, reason in _MUST_BE_OFF.items():
        value = cfg.get(key)
        if value not in (None, "none") and value:
            raise fail(reason.format(value))
    try:
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rank_pattern = dict(cfg.get("rank_pattern") or {})
        alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    except (TypeError, ValueError) as e:
        raise fail(f"r, lora_alpha, rank_pattern or alpha_pattern has a bad value: {e}") from None
    use_rslora = bool(cfg.get("use_rslora", False))
    _targets_in_config(cfg, base, fail)
    recorded = cfg.get("base_model_name_or_path")
    if served_model and isinstance(recorded, str) and not _same_base(recorded, served_model):
        raise fail(f"it was trained for base model {recorded!r}, but this server runs {served_model!r}")

    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise fail(f"only adapter_model.bin (pickle) is present; keel loads {WEIGHTS_FILE} only")
        raise fail(f"{WEIGHTS_FILE} is missing")
    shapes = _read_header(weights, fail)

    pairs: dict[str, dict[str, str]] = {}
    for tname in shapes:
        for marker, reason in _UNSUPPORTED_TENSORS.items():
            if marker in tname:
                raise fail(f"{reason} (tensor {tname})")
        m = _TENSOR.match(tname)
        if m is None:
            raise fail(f"tensor {tname!r} is not a LoRA weight (full weights of extra modules are not supported)")
        pairs.setdefault(m["module"], {})[m["ab"]] = tname
    if not pairs:
        raise fail(f"{WEIGHTS_FILE} holds no LoRA weights")

    ranks, scales, tensor_names, checked, num_params = {}, {}, {}, {}, 0
    for module, ab in sorted(pairs.items()):
        target = base.targets.get(module)
        if target is None:
            if module in base.other or module.endswith(_EMBEDDING_OR_HEAD):
                raise fail(_unsupported_target(module, base=base))
            raise fail(f"it adapts {module}, which the base model does not have")
        if set(ab) != {"A", "B"}:
            raise fail(f"{module} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        a_shape, b_shape = shapes[ab["A"]], shapes[ab["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise fail(f"{module}: lora_A {a_shape} and lora_B {b_shape} are not matrices")
        rank = a_shape[0]
        if a_shape[1] != target.in_features or b_shape != (target.out_features, rank):
            raise fail(f"{module}: lora_A {a_shape} and lora_B {b_shape} do not fit the base projection "
                       f"({target.out_features} x {target.in_features}): expected ({rank}, {target.in_features}) "
                       f"and ({target.out_features}, {rank})")
        want = _pattern_value(rank_pattern, module, r, fail)
        if rank != want:
            raise fail(f"{module} has rank {rank}, but adapter_config.json gives it rank {want}")
        if rank < 1 or rank > max_rank:
            raise fail(f"{module} has rank {rank}, over this server's max_lora_rank={max_rank}")
        try:
            a = float(_pattern_value(alpha_pattern, module, alpha, fail))
        except (TypeError, ValueError):
            raise fail(f"alpha_pattern gives {module} a value that is not a number") from None
        ranks[module] = rank
        scales[module] = a / math.sqrt(rank) if use_rslora else a / rank
        tensor_names[module] = (ab["A"], ab["B"])
        checked[module] = (a_shape, b_shape)
        num_params += rank * (target.in_features + target.out_features)
    return AdapterSpec(name, path, weights, ranks, scales, tensor_names, checked,
                       recorded if isinstance(recorded, str) else None, num_params=num_params)


def _read_header(weights: str, fail) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {}
            for k in f.keys():
                sl = f.get_slice(k)
                if not sl.get_dtype().startswith(("F", "BF")):
                    raise fail(f"tensor {k} has dtype {sl.get_dtype()}; LoRA weights must be floating point")
                shapes[k] = tuple(sl.get_shape())
            return shapes
    except LoRAError:
        raise
    except Exception as e:  # safetensors raises its own types for a bad header or a truncated file
        raise fail(f"{WEIGHTS_FILE} cannot be read: {e}") from None


def load_weights(spec: AdapterSpec, dtype: torch.dtype,
                 fold_scale: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A [r, in], scale * Bᵀ [r, out], 1.0) in `dtype` on the CPU: the layout the resident stacks
    hold, with the scale folded into B so the batched op is two plain matmuls; without fold_scale
    (A, Bᵀ, scale), B as stored (a bfloat16 file into bfloat16 stacks loses nothing)."""
    from safetensors import safe_open
    out = {}
    try:
        with safe_open(spec.weights_file, framework="pt") as f:
            for module, (a_name, b_name) in spec.tensor_names.items():
                a = f.get_tensor(a_name).to(torch.float32)
                b = f.get_tensor(b_name).to(torch.float32)
                if (tuple(a.shape), tuple(b.shape)) != spec.shapes[module]:
                    raise _fail(spec.name, spec.path, f"{module} changed shape since the adapter was validated")
                scale = spec.scales[module]
                bt = (b.t() * scale) if fold_scale else b.t()
                out[module] = (a.to(dtype).contiguous(), bt.to(dtype).contiguous(), 1.0 if fold_scale else scale)
    except LoRAError:
        raise
    except Exception as e:
        raise _fail(spec.name, spec.path, f"{WEIGHTS_FILE} cannot be read: {e}") from None
    return out
