"""Settings as dataclasses: the language model, the vision encoder, the BAGEL glue, the engine.

`checkpoint.py` fills the model settings from a checkpoint folder's JSON files (applying the
overrides the published code applies); `tiny.py` writes small ones; the model modules only read
them. `EngineConfig` shapes the batched engine and `EngineStats` is what it reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from irg_engine.model.vae import VaeConfig


@dataclass(slots=True)
class LMConfig:
    """Qwen2 Mixture-of-Transformers decoder (two experts of identical shape)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    qk_norm: bool = True
    qkv_bias: bool = True
    head_dim: int = 0

    def __post_init__(self) -> None:
        if min(self.num_heads, self.num_kv_heads) <= 0:
            raise ValueError("num_heads and num_kv_heads must be positive")
        if not (self.rope_theta > 0 and self.rms_eps > 0):
            raise ValueError(f"rope_theta {self.rope_theta} and rms_eps {self.rms_eps} must be > 0")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")
        if min(self.hidden_size, self.num_layers, self.intermediate_size, self.vocab_size) <= 0:
            raise ValueError("LMConfig sizes must be positive")


@dataclass(slots=True)
class ViTConfig:
    """SigLIP NaViT encoder; `num_layers` is the number that runs (the JSON lists one more)."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    patch_size: int = 14
    max_patches_per_side: int = 70
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ValueError(f"ViT hidden_size {self.hidden_size} not divisible by num_heads")
        if self.num_layers <= 0:
            raise ValueError("ViT needs at least one layer")
        if min(self.patch_size, self.max_patches_per_side) <= 0 or not self.layer_norm_eps > 0:
            raise ValueError("ViT patch_size, image_size and layer_norm_eps must be positive")


@dataclass(slots=True)
class BagelConfig:
    """Everything needed to build the model; values the published code hard-codes have defaults."""

    lm: LMConfig
    vit: ViTConfig
    vae: VaeConfig
    latent_patch_size: int = 2
    max_latent_size: int = 64
    timestep_features: int = 256
    extra: dict = field(default_factory=dict)

    @property
    def latent_token_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def pixels_per_latent_token(self) -> int:
        return self.latent_patch_size * self.vae.downsample


@dataclass(slots=True)
class EngineConfig:
    max_running: int = 16
    max_waiting: int = 256
    token_budget: int = 8192
    block_size: int = 16
    kv_tokens: int = 0  # 0: sized automatically (see `runner.auto_kv_tokens`)
    attention_backend: str = "auto"  # auto | sdpa | xformers (see irg_engine.attention)
    prefix_cache_entries: int = 8
    image_workers: int = 1  # threads for VAE encodes/decodes beside the step loop
    # CPU threads for torch ops, shared by the loop and the image workers: each busy worker
    # takes one, the loop the rest. 0: torch's thread count when the engine starts.
    cpu_threads: int = 0
    # Decode-only steps: auto = replayed as CUDA graphs on CUDA, the packed forward elsewhere;
    # off = always the packed forward; static = the graphs' static buffers, run eagerly (tests).
    decode_graphs: str = "auto"
    # With decode graphs: start the next decode step of the requests that decode again (unless
    # they draw their stop token) before the host reads this step's tokens (decode_ahead.py).
    decode_ahead: bool = True

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or self.token_budget < 1:
            raise ValueError("max_running and token_budget must be >= 1, max_waiting >= 0")
        if self.image_workers < 1:
            raise ValueError("image_workers must be >= 1")
        if self.cpu_threads < 0:
            raise ValueError("cpu_threads must be >= 0 (0: torch's thread count)")
        if self.decode_graphs not in ("auto", "off", "static"):
            raise ValueError(
                f"decode_graphs must be auto, off or static, got {self.decode_graphs!r}"
            )


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int
    tokens_decoded: int
    denoise_steps: int
    healthy: bool
    fault: str | None
