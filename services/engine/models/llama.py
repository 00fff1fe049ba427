"""The Llama family: Llama (with Llama-3 rope scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms).

One decoder serves all four; they differ only in the flags of `DecoderSpec`. The model is free of
serving concerns: it sees a flat batch of tokens (`[num_tokens, hidden]`, no padding) plus the
attention metadata, and attention itself is a backend injected from outside, which also owns the
paged KV cache layout.

Numerics follow transformers' own modules so greedy output matches token for token: RMSNorm in
float32 then cast, rotary tables computed in float32 per position then cast, rotate-half rotary.
Projections are fused (q|k|v and gate|up) for speed; `load_weights` slices the checkpoint's
separate matrices into them. The projections (`ops.linear`; the nn.Linear modules only hold the
parameters) and the elementwise work between them go through an `Ops` implementation
(services.engine.ops): plain torch for the reference, Triton kernels on the GPU. Layers pass the
residual stream separately, so each residual add fuses into the next norm:

    h, residual = add_rms_norm(h, residual)   # residual += h; h = norm(residual)
    h = attention(h)
    h, residual = add_rms_norm(h, residual)
    h = mlp(h)

The same decoder is the language model of the vision-language models (LLaVA over Llama / Qwen2 /
Mistral, Qwen2-VL, Qwen2.5-VL): the config's `text_config` describes it, and two inputs serve images:
  * `EmbeddingOverrides`: rows of the flat batch whose token embedding is replaced by an image's
    embedding row (the placeholder tokens of an image), as transformers' `masked_scatter` does;
  * multimodal rotary (M-RoPE, Qwen2-VL): positions may be `[3, num_tokens]` (temporal, height,
    width). Rotary frequency column j (of head_dim / 2, mirrored in the second half) takes its angle
    from position row `section(j) % 3`, the sections being `mrope_section` (e.g. [16, 24, 24]):

        columns:  | 0 .. s0-1 : t | s0 .. s0+s1-1 : h | ... : w | (mirrored for the second half)

    The cos/sin rows are gathered once per forward from the usual per-position tables, so each layer
    runs the ordinary rotary op over a table of one row per token. When the three rows are equal
    (text, and every decode step) this is plain rotary at that position, which callers pass as
    `[num_tokens]` positions so the fast paths (CUDA graphs included) are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from services.common.errors import ModelLoadError
from services.engine.ops import TORCH_OPS, Ops


@dataclass(frozen=True)
class DecoderSpec:
    """What the decoder needs from an HF config, resolved once."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    # M-RoPE: rotary frequencies (head_dim / 2 of them) per position component (t, h, w); None: plain rope
    mrope_section: tuple[int, ...] | None = None

    @classmethod
    def from_hf_config(cls, config: Any) -> DecoderSpec:
        """From a causal LM's config, or a vision-language model's (its `text_config` is the decoder)."""
        text = getattr(config, "text_config", None) or config
        arch = (getattr(config, "architectures", None) or [""])[0]
        model_type = getattr(text, "model_type", "")
        num_heads = text.num_attention_heads
        rope = _rope_parameters(text)
        mrope = model_type in _MROPE_MODEL_TYPES
        return cls(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            # Qwen2-VL's attention always splits hidden_size evenly, whatever head_dim says
            head_dim=(None if mrope else getattr(text, "head_dim", None)) or text.hidden_size // num_heads,
            rms_norm_eps=text.rms_norm_eps,
            max_position_embeddings=text.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope.get("rope_type", "default") not in ("default", "mrope") else None,
            qkv_bias=(
                arch == "Qwen2ForCausalLM"
                or model_type in _QKV_BIAS_MODEL_TYPES
                or bool(getattr(text, "attention_bias", False))
            ),
            qk_norm=arch == "Qwen3ForCausalLM" or model_type == "qwen3",
            # transformers 5 decides tying on the outer config (it forwards a text_config's True there)
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            mrope_section=tuple(rope.get("mrope_section", _DEFAULT_MROPE_SECTION)) if mrope else None,
        )


_QKV_BIAS_MODEL_TYPES = frozenset({"qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"})
_MROPE_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"})
_DEFAULT_MROPE_SECTION = (16, 24, 24)  # transformers' default when a Qwen2-VL config names none


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in rope_scaling/rope_theta."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy:
        params = {**legacy, **params}
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache, then attends. Owns the cache layout."""

    def forward(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> like q."""
        ...


class RMSNorm(nn.Module):
    """Holds the weight; the arithmetic is the Ops implementation's (float32 variance, as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps


@dataclass
class RotaryTables:
    """What every layer's rotary op reads in one forward: row `positions[t]` of cos/sin rotates token t."""

    cos: torch.Tensor  # [num_rows, head_dim]
    sin: torch.Tensor  # [num_rows, head_dim]
    positions: torch.Tensor  # [num_tokens] int64 rows of the tables


class RotaryEmbedding:
    """Precomputed cos/sin tables, one row per position, in the model dtype."""

    def __init__(self, spec: DecoderSpec, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = _inv_freq(spec, device)
        positions = torch.arange(spec.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_pos, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, head_dim]
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)
        section = getattr(spec, "mrope_section", None)
        # [head_dim]: the position component (0 t, 1 h, 2 w) whose angle each column takes
        self.mrope_component = None if section is None else _mrope_components(section, spec.head_dim, device)

    def tables(self, positions: torch.Tensor) -> RotaryTables:
        """positions: [num_tokens] (plain rope), or [3, num_tokens] (M-RoPE, models with mrope_section)."""
        if positions.dim() == 1:
            return RotaryTables(self.cos, self.sin, positions)
        assert self.mrope_component is not None, "3-D positions need a model with mrope_section"
        num_tokens = positions.shape[1]
        columns = self.mrope_component[None, None, :].expand(1, num_tokens, -1)  # [1, T, D]
        cos = self.cos[positions].gather(0, columns)[0]  # [3, T, D] -> [T, D]
        sin = self.sin[positions].gather(0, columns)[0]
        return RotaryTables(cos, sin, torch.arange(num_tokens, device=positions.device))


def _mrope_components(section: tuple[int, ...], head_dim: int, device: torch.device) -> torch.Tensor:
    if sum(section) != head_dim // 2:
        raise ModelLoadError(
            f"config.json: mrope_section {list(section)} must add up to head_dim / 2 = {head_dim // 2}"
        )
    half = torch.cat([torch.full((n,), i % 3, dtype=torch.int64) for i, n in enumerate(section)])
    return torch.cat((half, half)).to(device)


@dataclass
class EmbeddingOverrides:
    """Rows of the flat batch whose input embedding is given (images' placeholder tokens)."""

    rows: torch.Tensor  # [num_rows] int64, indices into the step's tokens
    embeddings: torch.Tensor  # [num_rows, hidden_size] in the model dtype


def _inv_freq(spec: DecoderSpec, device: torch.device) -> torch.Tensor:
    dim = spec.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (spec.rope_theta**exponents)
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ModelLoadError(f"config.json: rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_index: int, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(self, x: torch.Tensor, rotary: RotaryTables, backend: AttentionBackend) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.ops.rms_norm_heads(q, self.q_norm.weight, self.q_norm.eps)
            k = self.ops.rms_norm_heads(k, self.k_norm.weight, self.k_norm.eps)
        q, k = self.ops.rotary(q, k, rotary.cos, rotary.sin, rotary.positions)
        out = backend.forward(self.layer_index, q, k, v)  # [num_tokens, num_heads, head_dim]
        return self.ops.linear(out.reshape(num_tokens, self.q_size), self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.ops.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
        return self.ops.linear(self.ops.silu_and_mul(gate_up), self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_index: int, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_index, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, ops)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryTables, backend: AttentionBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: this layer's input (the previous layer's output, not yet added); residual: the stream so far."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h, residual = self.ops.add_rms_norm(h, residual, norm1.weight, norm1.eps)
        h = self.self_attn(h, rotary, backend)
        h, residual = self.ops.add_rms_norm(h, residual, norm2.weight, norm2.eps)
        return self.mlp(h), residual


class DecoderLM(nn.Module):
    """Token ids -> hidden states -> logits. Built on the meta device, then materialised."""

    def __init__(self, spec: DecoderSpec, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.spec = spec
        self.ops = ops
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, ops) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None

    def init_rotary(self) -> None:
        weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(self.spec, weight.device, weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """input_ids: [num_tokens]; positions: [num_tokens] or, for M-RoPE, [3, num_tokens]
        -> hidden states [num_tokens, hidden_size]."""
        assert self.rotary is not None, "init_rotary() must run after the weights are materialised"
        h, residual = self.embed_tokens(input_ids), None
        if overrides is not None:
            h.index_copy_(0, overrides.rows, overrides.embeddings)
        rotary = self.rotary.tables(positions)
        for layer in self.layers:
            h, residual = layer(h, residual, rotary, backend)
        h, _ = self.ops.add_rms_norm(h, residual, self.norm.weight, self.norm.eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, hidden_size] -> logits [rows, vocab_size]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.ops.linear(hidden, weight)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the fused parameters; every parameter must be filled."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for hf_name, tensor in weights:
            target = self._map_name(hf_name)
            if target is None:
                continue
            name, rows = target
            if name not in params:
                raise ModelLoadError(f"checkpoint tensor {hf_name!r} has no place in the model")
            dest = params[name].data if rows is None else params[name].data[rows[0] : rows[1]]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            filled.add(f"{name}[{rows}]" if rows else name)
        self._check_all_filled(filled)

    def _map_name(self, hf_name: str) -> tuple[str, tuple[int, int] | None] | None:
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the embedding is the head
        spec = self.spec
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        inter = spec.intermediate_size
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", (0, q)),
            "self_attn.k_proj": ("self_attn.qkv_proj", (q, q + kv)),
            "self_attn.v_proj": ("self_attn.qkv_proj", (q + kv, q + 2 * kv)),
            "mlp.gate_proj": ("mlp.gate_up_proj", (0, inter)),
            "mlp.up_proj": ("mlp.gate_up_proj", (inter, 2 * inter)),
        }
        for part, (fused_part, rows) in fused.items():
            if f".{part}." in name:
                return name.replace(part, fused_part), rows
        return name, None

    def _check_all_filled(self, filled: set[str]) -> None:
        spec = self.spec
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        inter = spec.intermediate_size
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                expected |= {f"{name}[{r}]" for r in [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]}
            elif name.endswith("gate_up_proj.weight"):
                expected |= {f"{name}[{r}]" for r in [(0, inter), (inter, 2 * inter)]}
            else:
                expected.add(name)
        missing = sorted(expected - filled)
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, first: {missing[:3]}")

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights of the real shapes (benchmarks): small uniform values, norms at one."""
        generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.uniform_(-0.02, 0.02, generator=generator)
