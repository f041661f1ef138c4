"""The model's shape, read from a Hugging Face config.json dict (older and newer key names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.errors import ModelLoadError, UnsupportedModelError


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str | None
    hidden_act: str = "silu"
    mlp_bias: bool = False
    rotary_dim: int | None = None  # channels of each head that rotate (None: all of them)
    extra: dict = field(default_factory=dict, repr=False)  # the whole config.json, for family-specific keys

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json names no architecture (the 'architectures' key is missing)")
        from keel.models.registry import FAMILIES, model_class
        if archs[0] in FAMILIES:
            cfg = model_class(archs[0]).normalize_config(dict(cfg))
        try:
            hidden = cfg["hidden_size"]
            heads = cfg["num_attention_heads"]
            rope = cfg.get("rope_parameters") or {}
            # transformers 5 nests rope settings in rope_parameters; older configs have them at the top
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = rope
            eos = cfg.get("eos_token_id")
            window = cfg.get("sliding_window")
            if cfg.get("use_sliding_window") is False:
                window = None
            head_dim = cfg.get("head_dim") or hidden // heads
            partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
            return cls(
                architecture=archs[0],
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                sliding_window=window,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
                extra=cfg,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the key {e.args[0]!r}") from None

    def check(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        from keel.layers.activation import activation
        activation(self.hidden_act)
