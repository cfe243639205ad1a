"""The Qwen2 Mixture-of-Transformers decoder: two experts per layer, one joint attention.

Data flow of one forward: input rows `x [n, hidden]` (already embedded by `bagel.py`), their RoPE
positions, and an `ExpertRoutes` saying which rows belong to the understanding expert (text,
markers, ViT tokens) and which to the generation expert (VAE latents). Each layer projects every
row with its own expert's weights, applies QK-norm and RoPE, lets the `AttentionPlan` attend (and
write KV), then runs its expert's output projection and MLP. The final norm is also per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from irg_engine.attention import AttentionPlan
from irg_engine.config import LMConfig
from irg_engine.model.fused import silu_mul
from irg_engine.model.fused_norm import add_rms_norm, norm_rope_qk

UND, GEN = 0, 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics and scaling in float32, as the published model. It rounds to the compute
        # dtype before multiplying by the weight; the fused kernel multiplies first and rounds
        # once: bitwise the same in float32, within one bf16 ulp in bf16, and one pass over the
        # rows fewer (on CUDA, one kernel instead of the published eight).
        return F.rms_norm(x, self.weight.shape, self.weight, eps=self.eps)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[n, head_dim]` for rotate-half RoPE; angles are float32 as in the reference."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
            / head_dim
        )
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@dataclass(slots=True)
class ExpertRoutes:
    """Row indices per expert; `None` for an expert means it owns every row (the fast path).

    With `gen_from` set (the engine's packed steps, whose image blocks come last), the
    generation expert runs on the contiguous rows `gen_from:` as a slice, with no gather or
    scatter, and the understanding expert's rows `und` (the text before, and the two markers
    of each image block among those rows) overwrite its results there. The markers cost the
    generation expert two wasted rows per block; the gathers and scatters of its thousands
    of latent rows, a copy of each per layer, are gone.
    """

    und: torch.Tensor | None
    gen: torch.Tensor | None
    everything: int | None = None  # expert index when one expert owns all rows
    gen_from: int | None = None

    @staticmethod
    def from_mask(gen_mask: torch.Tensor) -> ExpertRoutes:
        n_gen = int(gen_mask.sum())
        if n_gen == 0:
            return ExpertRoutes(None, None, UND)
        if n_gen == gen_mask.numel():
            return ExpertRoutes(None, None, GEN)
        return ExpertRoutes(torch.nonzero(~gen_mask).squeeze(1), torch.nonzero(gen_mask).squeeze(1))

    def groups(self) -> list[tuple[int, torch.Tensor | None]]:
        if self.everything is not None:
            return [(self.everything, None)]
        return [(UND, self.und), (GEN, self.gen)]


def gather(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def scatter(out: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if rows is None:
        return value
    out.index_copy_(0, rows, value)
    return out


class Expert(nn.Module):
    """One expert's weights for one layer: attention projections, QK-norms, MLP, two norms.

    q/k/v are one joined projection and gate/up another: one GEMM each instead of three and
    two, because a decode step's small GEMMs read their weights at a fraction of the bandwidth
    one large GEMM reaches. The state dict keeps the published parts (`q_proj.weight`, ...):
    it splits the joined tensors on the way out, and on the way in the load hook concatenates
    them (`join_parts`) or the checkpoint loader copies each part into its rows (`part_rows`).
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        q, kv, mlp = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
        # Each joined projection's parts, in the order of its output rows.
        self.parts = {
            "qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
            "gate_up_proj": (("gate_proj", mlp), ("up_proj", mlp)),
        }
        self.input_norm = RMSNorm(h, cfg.rms_eps)
        self.qkv_proj = nn.Linear(h, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, cfg.rms_eps) if cfg.qk_norm else nn.Identity()
        self.post_norm = RMSNorm(h, cfg.rms_eps)
        self.gate_up_proj = nn.Linear(h, 2 * mlp, bias=False)
        self.down_proj = nn.Linear(mlp, h, bias=False)
        self.register_state_dict_post_hook(_split_parts)
        self.register_load_state_dict_pre_hook(
            lambda module, state, prefix, *_: module.join_parts(state, prefix)
        )

    def join_parts(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Replace the published parts in `state` (keys under `prefix`) by the joined tensors."""
        for joined, parts in self.parts.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part, _ in parts]
                if all(n in state for n in names):
                    state[f"{prefix}{joined}.{kind}"] = torch.cat([state.pop(n) for n in names])

    def qkv(
        self,
        x: torch.Tensor,
        heads: int,
        kv_heads: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Queries and keys after QK-norm and RoPE (into `out` if given), and values, `[rows,
        heads, head_dim]` (values are a view into the joined projection's output)."""
        h = self.input_norm(x)
        q, k, v = (
            self.qkv_proj(h)
            .unflatten(-1, (heads + 2 * kv_heads, -1))
            .split([heads, kv_heads, kv_heads], dim=1)
        )
        qk_norm = isinstance(self.q_norm, RMSNorm)
        norms = (self.q_norm.weight, self.k_norm.weight) if qk_norm else None
        eps = self.q_norm.eps if qk_norm else 0.0
        return *norm_rope_qk(q, k, norms, eps, *rope, out=out), v

    def finish(
        self, x: torch.Tensor, attn: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The residual stream after the output projection and the MLP (into `out` if given)."""
        x, h = add_rms_norm(x, self.o_proj(attn), self.post_norm.weight, self.post_norm.eps)
        return torch.add(x, self.down_proj(silu_mul(self.gate_up_proj(h))), out=out)


def _split_parts(expert: Expert, state: dict, prefix: str, _metadata) -> None:
    """State-dict hook: the joined tensors as their published parts, in the published order
    (each part's weight, then its bias). The parts are views of the joined tensors."""
    mine = [k for k in state if k.startswith(prefix)]
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key in mine:
        module, kind = key[len(prefix) :].rsplit(".", 1)
        tensors.setdefault(module, {})[kind] = state.pop(key)
    for module, kinds in tensors.items():
        parts = expert.parts.get(module)
        if parts is None:
            for kind, t in kinds.items():
                state[f"{prefix}{module}.{kind}"] = t
            continue
        pieces = {kind: t.split([n for _, n in parts]) for kind, t in kinds.items()}
        for i, (part, _) in enumerate(parts):
            for kind in kinds:
                state[f"{prefix}{part}.{kind}"] = pieces[kind][i]


def part_rows(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """For every published part of every expert in `model` (state-dict names from its root):
    the joined parameter that holds it and the rows it fills there, `(name, start, end)`."""
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, Expert):
            for joined, parts in module.parts.items():
                kinds = [kind for kind, _ in getattr(module, joined).named_parameters()]
                start = 0
                for part, size in parts:
                    for kind in kinds:
                        rows[f"{name}.{part}.{kind}"] = (
                            f"{name}.{joined}.{kind}",
                            start,
                            start + size,
                        )
                    start += size
    return rows


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList([Expert(cfg), Expert(cfg)])

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routes: ExpertRoutes,
        plan: AttentionPlan,
        index: int,
    ) -> torch.Tensor:
        q, k, v = self._project(x, rope, routes)
        attn = plan.attend(index, q, k, v).flatten(1)
        return self._finish(x, attn, routes)

    def _project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], routes: ExpertRoutes
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's q/k/v by its own expert, with RoPE applied to q and k."""
        cfg = self.cfg
        heads = (cfg.num_heads, cfg.num_kv_heads)
        if routes.everything is not None:  # one expert owns every row: no gather/scatter
            return self.experts[routes.everything].qkv(x, *heads, rope)
        q, k, v = self._empty_qkv(x)
        cos, sin = rope
        if routes.gen_from is None:
            for e, rows in routes.groups():
                rows_rope = (gather(cos, rows), gather(sin, rows))
                qe, ke, ve = self.experts[e].qkv(gather(x, rows), *heads, rows_rope)
                q, k, v = scatter(q, rows, qe), scatter(k, rows, ke), scatter(v, rows, ve)
            return q, k, v
        # The generation expert's slice is written in place; the understanding rows overwrite
        # their places among it (see ExpertRoutes).
        start, und = routes.gen_from, routes.und
        gen_rope = (cos[start:], sin[start:])
        _, _, vg = self.experts[GEN].qkv(x[start:], *heads, gen_rope, out=(q[start:], k[start:]))
        v[start:] = vg
        und_rope = (cos.index_select(0, und), sin.index_select(0, und))
        qu, ku, vu = self.experts[UND].qkv(x.index_select(0, und), *heads, und_rope)
        q.index_copy_(0, und, qu)
        k.index_copy_(0, und, ku)
        v.index_copy_(0, und, vu)
        return q, k, v

    def _finish(self, x: torch.Tensor, attn: torch.Tensor, routes: ExpertRoutes) -> torch.Tensor:
        """Every row's output projection and MLP by its own expert."""
        if routes.everything is not None:
            return self.experts[routes.everything].finish(x, attn)
        out = torch.empty_like(x)
        if routes.gen_from is None:
            for e, rows in routes.groups():
                rows_out = self.experts[e].finish(gather(x, rows), gather(attn, rows))
                out = scatter(out, rows, rows_out)
            return out
        start, und = routes.gen_from, routes.und
        self.experts[GEN].finish(x[start:], attn[start:], out=out[start:])
        und_rows = self.experts[UND].finish(x.index_select(0, und), attn.index_select(0, und))
        return out.index_copy_(0, und, und_rows)

    def _empty_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step-wide q/k/v that each expert's rows are written into."""
        cfg, n = self.cfg, x.shape[0]
        return (
            x.new_empty(n, cfg.num_heads, cfg.head_dim),
            x.new_empty(n, cfg.num_kv_heads, cfg.head_dim),
            x.new_empty(n, cfg.num_kv_heads, cfg.head_dim),
        )


class LanguageModel(nn.Module):
    """Embedding, decoder layers, per-expert final norms and the (untied) lm_head."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norms = nn.ModuleList([RMSNorm(cfg.hidden_size, cfg.rms_eps) for _ in range(2)])
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        routes: ExpertRoutes,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        """Hidden states after the final (per-expert) norm, one row per input row."""
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        rope = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, routes, plan, i)
        out = torch.empty_like(x)
        if routes.gen_from is not None:
            out[routes.gen_from :] = self.norms[GEN](x[routes.gen_from :])
            return out.index_copy_(0, routes.und, self.norms[UND](x.index_select(0, routes.und)))
        for e, rows in routes.groups():
            out = scatter(out, rows, self.norms[e](gather(x, rows)))
        return out
