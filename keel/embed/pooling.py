"""How token states become one vector: read from the sentence-transformers files next to the weights
(`modules.json`, `<pooling folder>/config.json`, a Normalize module), with defaults where they are absent.

Modes: cls (first token), mean (over real tokens), max, mean_sqrt_len (sum / sqrt(length)) and
lasttoken (the last real token: decoder embedding models such as Qwen3-Embedding). Several modes set
at once are concatenated in sentence-transformers' order, as it does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keel.errors import ModelLoadError
from keel.models.loader import read_json

ORDER = ("cls", "lasttoken", "max", "mean", "mean_sqrt_len")  # sentence-transformers' concatenation order
KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
        "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken"}


@dataclass
class Pooling:
    modes: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None = None  # sentence_bert_config.json's limit, if any
    source: str = "default"

    def __call__(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """states [B, T, H], lengths [B] -> [B, H * len(modes)] float32."""
        states = states.float()
        b, t, _ = states.shape
        keep = (torch.arange(t, device=states.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(states[:, 0])
            elif mode == "lasttoken":
                parts.append(states[torch.arange(b), lengths - 1])
            elif mode == "max":
                parts.append(states.masked_fill(~keep, float("-inf")).amax(dim=1))
            else:
                total = (states * keep).sum(dim=1)
                n = lengths[:, None].to(states.dtype)
                parts.append(total / (n if mode == "mean" else n.sqrt()))
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return F.normalize(out, dim=-1) if self.normalize else out


def read_pooling(folder: str, default_modes: tuple[str, ...], default_normalize: bool) -> Pooling:
    """The pooling that the folder's sentence-transformers files describe; the defaults without them."""
    modules_path = os.path.join(folder, "modules.json")
    st_config = os.path.join(folder, "sentence_bert_config.json")
    max_len = read_json(st_config).get("max_seq_length") if os.path.isfile(st_config) else None
    if not os.path.isfile(modules_path):
        return Pooling(default_modes, default_normalize, max_len)
    modules = read_json(modules_path)
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_path} is not a list of modules")
    modes, normalize = None, False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = read_json(os.path.join(folder, m.get("path", ""), "config.json"))
            if config.get("pooling_mode_weightedmean_tokens"):
                raise ModelLoadError("weighted-mean pooling is not supported")
            modes = tuple(mode for mode in ORDER if config.get(KEYS[mode]))
            if not modes:
                raise ModelLoadError(f"the pooling config in {folder} sets no pooling mode")
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer",):
            raise ModelLoadError(f"sentence-transformers module {m.get('type')!r} is not supported "
                                 "(Transformer, Pooling and Normalize are)")
    if modes is None:
        modes = default_modes
    return Pooling(modes, normalize, max_len, source="modules.json")
