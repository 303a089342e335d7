"""OFA: a ResNet-fed, BART-style pre-LN encoder-decoder with OFA's position machinery.

Module and parameter names equal the official fairseq checkpoints', so importing them is a
checked identity mapping. Tensors are batch-first: (B, T, D). Shapes are written inline.

What differs from a plain BART (see the reference notes for the why):
- image patches (ResNet stage-3 features) are projected and placed before the text tokens;
- absolute positions never touch the embeddings: they enter every layer as one shared attention
  bias (W_q LN(p_i)) . (W_k LN(p_j)) / sqrt(2 d_head), plus a per-layer relative-position bias
  (log buckets for text, 2-D buckets for image patches);
- attention is scaled by 1/sqrt(2 d_head); NormFormer layernorms and per-head scales `c_attn`;
- the decoder starts from <s>; output projection tied to the token embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ofa_model.architecture import OFAConfig, Regularization
from ofa_model.resnet import ResNet, drop_path, linspace

# ----------------------------------------------------------------------------------------------
# Relative-position buckets


def token_rel_bucket(rel: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Bucket index (0 .. 2*bucket_size-2) of text relative distances `rel` = i - j.

    |rel| <= bucket_size // 2 keeps its own bucket; larger distances share log-spaced buckets
    up to `max_position - 1`. Elementwise, in float32 like the released models were built.
    """
    mid = bucket_size // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos.le(mid), rel, log_pos.int().long() * sign)
    return bucket + bucket_size - 1


def token_bucket_matrix(rows: torch.Tensor, cols: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """(len(rows), len(cols)) buckets for query positions `rows` and key positions `cols`.

    Distances beyond the table (a 1025-token image-code target) share the farthest bucket.
    """
    rel = (rows[:, None] - cols[None, :]).clamp(-(max_position - 1), max_position - 1)
    return token_rel_bucket(rel, bucket_size, max_position)


def image_position_ids(h: int, w: int, bucket_size: int, device=None) -> torch.Tensor:
    """(h*w,) 1-based row-major ids of an h x w patch grid on a bucket_size-wide canvas; 0 is reserved."""
    return (torch.arange(w, device=device)[None, :] + torch.arange(h, device=device)[:, None] * bucket_size + 1).view(-1)


def image_rel_bucket(pos_q: torch.Tensor, pos_k: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """2-D relative bucket between patch ids: (..., Tq) x (..., Tk) -> (..., Tq, Tk).

    Index (dr + B - 1) * (2B - 1) + (dc + B - 1) for row/column offsets dr, dc; id 0 (no patch)
    gets the three reserved buckets n-3 (query 0), n-2 (key 0), n-1 (both), n = (2B-1)^2 + 3.
    """
    n = (2 * bucket_size - 1) ** 2 + 3
    rq, cq = torch.div(pos_q - 1, bucket_size, rounding_mode="floor"), (pos_q - 1) % bucket_size
    rk, ck = torch.div(pos_k - 1, bucket_size, rounding_mode="floor"), (pos_k - 1) % bucket_size
    idx = (rq[..., :, None] - rk[..., None, :] + bucket_size - 1) * (2 * bucket_size - 1)
    idx = idx + (cq[..., :, None] - ck[..., None, :] + bucket_size - 1)
    zq, zk = (pos_q == 0)[..., :, None], (pos_k == 0)[..., None, :]
    idx = torch.where(zk, torch.full_like(idx, n - 2), idx)
    idx = torch.where(zq, torch.full_like(idx, n - 3), idx)
    return torch.where(zq & zk, torch.full_like(idx, n - 1), idx)


def decoder_image_position_ids(config: OFAConfig) -> torch.Tensor:
    """(max_target_positions + 2,) patch ids for image-code targets: <s> -> 0, then the code grid."""
    side = config.code_image_size // 8
    grid = image_position_ids(side, side, config.image_bucket_size)
    length = config.max_target_positions + 2
    tail = torch.full((max(0, length - 1 - grid.numel()),), 1024, dtype=torch.long)  # as the official buffer
    return torch.cat([torch.zeros(1, dtype=torch.long), grid, tail])[:length]


def _mask_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


# ----------------------------------------------------------------------------------------------
# Attention and layers


class MultiheadAttention(nn.Module):
    """Multi-head attention with an additive bias, OFA scaling and NormFormer head scales."""

    def __init__(self, embed_dim: int, num_heads: int, scale_factor: float, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.c_attn = nn.Parameter(torch.ones(num_heads))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, dh)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, dh) of `x` (B, S, D)."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) attends to k, v (B, H, S, dh) with additive bias (B or 1, H, T, S) -> (B, T, D)."""
        q = self._heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0, scale=self.scaling
        )  # (B, H, T, dh)
        out = out * self.c_attn.view(1, -1, 1, 1).to(out.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


def _ffn(layer: EncoderLayer | DecoderLayer, x: torch.Tensor) -> torch.Tensor:
    """Pre-LN feed-forward branch (B, T, D) -> (B, T, D): LN -> fc1 -> GELU -> NormFormer mid LN -> fc2."""
    h = F.gelu(layer.fc1(layer.final_layer_norm(x)))  # (B, T, F)
    h = F.dropout(h, layer.activation_dropout, layer.training)
    h = layer.fc2(layer.ffn_layernorm(h))  # (B, T, D)
    return F.dropout(h, layer.dropout, layer.training)


class EncoderLayer(nn.Module):
    """Pre-LN self-attention + feed-forward block with NormFormer layernorms: (B, S, D) -> (B, S, D)."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, *, attn_scale_factor: float, eps: float,
                 dropout: float = 0.0, attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        d = embed_dim
        self.dropout, self.activation_dropout, self.drop_path_rate = dropout, activation_dropout, drop_path_rate
        self.self_attn = MultiheadAttention(d, num_heads, attn_scale_factor, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.attn_ln = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), bias (B or 1, H, S, S) -> (B, S, D)."""
        h = self.self_attn_layer_norm(x)
        h = self.attn_ln(self.self_attn(h, *self.self_attn.project_kv(h), bias))
        x = x + drop_path(F.dropout(h, self.dropout, self.training), self.drop_path_rate, self.training)
        return x + drop_path(_ffn(self, x), self.drop_path_rate, self.training)


@dataclass
class LayerCache:
    """One decoder layer's keys and values; None until the first decoding step fills them."""

    self_k: torch.Tensor | None = None  # (B, H, t, dh) for the t target positions so far
    self_v: torch.Tensor | None = None  # (B, H, t, dh)
    cross_k: torch.Tensor | None = None  # (B, H, S, dh) for the S source positions, computed once
    cross_v: torch.Tensor | None = None  # (B, H, S, dh)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index`, in place."""
        if self.self_k is not None:
            self.self_k, self.self_v = self.self_k.index_select(0, index), self.self_v.index_select(0, index)
        if self.cross_k is not None:
            self.cross_k, self.cross_v = self.cross_k.index_select(0, index), self.cross_v.index_select(0, index)


class DecoderLayer(nn.Module):
    """Pre-LN self-attention, cross-attention and feed-forward block with NormFormer layernorms."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, *, attn_scale_factor: float, eps: float,
                 dropout: float = 0.0, attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        d = embed_dim
        self.dropout, self.activation_dropout, self.drop_path_rate = dropout, activation_dropout, drop_path_rate
        self.self_attn = MultiheadAttention(d, num_heads, attn_scale_factor, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn_ln = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = MultiheadAttention(d, num_heads, attn_scale_factor, attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn_ln = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, cross_bias: torch.Tensor, cache: LayerCache,
                memory: torch.Tensor) -> torch.Tensor:
        """x (B, Tn, D) new positions -> (B, Tn, D); encoder states `memory` (B, S, D).

        Biases (B|1, H, Tn, T) and (B, H, Tn, S), T = t + Tn; `cache` grows in place.
        """
        res = x
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)  # (B, H, Tn, dh)
        if cache.self_k is not None:
            k, v = torch.cat([cache.self_k, k], dim=2), torch.cat([cache.self_v, v], dim=2)  # (B, H, T, dh)
        cache.self_k, cache.self_v = k, v
        h = self.self_attn_ln(self.self_attn(h, k, v, self_bias))
        x = res + drop_path(F.dropout(h, self.dropout, self.training), self.drop_path_rate, self.training)
        if cache.cross_k is None:
            cache.cross_k, cache.cross_v = self.encoder_attn.project_kv(memory)  # (B, H, S, dh)
        h = self.encoder_attn_layer_norm(x)
        h = self.cross_attn_ln(self.encoder_attn(h, cache.cross_k, cache.cross_v, cross_bias))
        x = x + drop_path(F.dropout(h, self.dropout, self.training), self.drop_path_rate, self.training)
        return x + drop_path(_ffn(self, x), self.drop_path_rate, self.training)


def _layer_args(cfg: OFAConfig, reg: Regularization) -> dict:
    """The scalar constructor arguments shared by every encoder and decoder layer."""
    return dict(embed_dim=cfg.embed_dim, num_heads=cfg.attention_heads, ffn_dim=cfg.ffn_dim,
                attn_scale_factor=cfg.attn_scale_factor, eps=cfg.layer_norm_eps, dropout=reg.dropout,
                attention_dropout=reg.attention_dropout, activation_dropout=reg.activation_dropout)


# ----------------------------------------------------------------------------------------------
# Encoder


@dataclass
class EncoderOut:
    """Encoder states: hidden (B, S, D), padding_mask (B, S) True at padding, pos_embed (B, S, D) normalised."""

    hidden: torch.Tensor
    padding_mask: torch.Tensor
    pos_embed: torch.Tensor

    def index_select(self, index: torch.Tensor) -> EncoderOut:
        """Rows `index` of the batch (for beams or candidates)."""
        return EncoderOut(self.hidden.index_select(0, index), self.padding_mask.index_select(0, index),
                          self.pos_embed.index_select(0, index))


def _pos_bias(q_lin: nn.Linear, k_lin: nn.Linear, pos_q: torch.Tensor, pos_k: torch.Tensor, heads: int,
              scaling: float) -> torch.Tensor:
    """Absolute-position attention bias (B, H, Tq, Tk) from normalised position embeddings (B, T, D)."""
    b, tq, d = pos_q.shape
    q = q_lin(pos_q).view(b, tq, heads, d // heads).transpose(1, 2) * scaling
    k = k_lin(pos_k).view(pos_k.shape[0], pos_k.shape[1], heads, d // heads).transpose(1, 2)
    return q @ k.transpose(-1, -2)


class Encoder(nn.Module):
    """Image patches and source tokens -> EncoderOut; the config is unpacked here for the layers."""

    def __init__(self, cfg: OFAConfig, reg: Regularization, embed_tokens: nn.Embedding):
        super().__init__()
        d, eps, heads = cfg.embed_dim, cfg.layer_norm_eps, cfg.attention_heads
        self.cfg, self.dropout = cfg, reg.dropout
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(d, eps=eps)
        self.type_embedding = nn.Embedding(2, d)
        self.embed_images = ResNet(cfg.resnet_layers, reg.resnet_drop_path, cfg.resnet_width)
        self.image_proj = nn.Linear(cfg.resnet_out_channels, d)
        self.patch_layernorm_embedding = nn.LayerNorm(d, eps=eps)
        self.embed_positions = nn.Embedding(cfg.max_source_positions + 2, d)
        self.embed_image_positions = nn.Embedding(cfg.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d, eps=eps)
        self.image_pos_ln = nn.LayerNorm(d, eps=eps)
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        self.pos_scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5
        self.layers = nn.ModuleList(EncoderLayer(**_layer_args(cfg, reg), drop_path_rate=r)
                                    for r in linspace(reg.encoder_drop_path, cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=eps)
        n_img = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(cfg.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_img, heads) for _ in range(cfg.encoder_layers))

    def embed_image(self, patch_images: torch.Tensor, patch_masks: torch.Tensor | None, sample_patch_num: int | None,
                    generator: torch.Generator | None):
        """Patch embeddings (B, N, D), padding (B, N), position ids of images (B, 3, H, W).

        The position ids are (1, N) when every row has the same patches (no patch sampling), so that the
        position biases built from them are computed once and broadcast over the batch; else (B, N).
        """
        feats = self.embed_images(patch_images)  # (B, C, h, w)
        b, _, h, w = feats.shape
        if max(h, w) > self.cfg.image_bucket_size:
            raise ValueError(f"image grid {h}x{w} exceeds image_bucket_size {self.cfg.image_bucket_size} "
                             f"(max {self.cfg.image_bucket_size * 16} px)")
        feats = feats.flatten(2).transpose(1, 2)  # (B, N, C)
        pos_ids = image_position_ids(h, w, self.cfg.image_bucket_size, feats.device)[None]  # (1, N)
        if patch_masks is None:
            pad = torch.zeros(b, h * w, dtype=torch.bool, device=feats.device)
        else:
            pad = (~patch_masks.bool())[:, None].expand(b, h * w)
        if sample_patch_num is not None and sample_patch_num < h * w:  # random subset of patches (pretraining)
            order = torch.stack([torch.randperm(h * w, generator=generator)[:sample_patch_num] for _ in range(b)])
            order = order.sort(dim=1).values.to(feats.device)
            feats = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))
            pos_ids, pad = pos_ids.expand(b, -1).gather(1, order), pad.gather(1, order)
        x = self.image_proj(feats) + self.type_embedding.weight[1]
        return self.patch_layernorm_embedding(x), pad, pos_ids

    def forward(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
                patch_masks: torch.Tensor | None = None, sample_patch_num: int | None = None,
                generator: torch.Generator | None = None) -> EncoderOut:
        """src_tokens (B, L) [+ patch_images (B, 3, H, W), patch_masks (B,)] -> EncoderOut over S = N + L."""
        cfg = self.cfg
        b, length = src_tokens.shape
        if length > cfg.max_source_positions:
            raise ValueError(f"source length {length} exceeds max_source_positions {cfg.max_source_positions}")
        dev = src_tokens.device
        x = self.layernorm_embedding(self.embed_tokens(src_tokens) + self.type_embedding.weight[0])  # (B, L, D)
        x = F.dropout(x, self.dropout, self.training)
        pad = src_tokens.eq(cfg.pad_id)  # (B, L)
        # Positions, and the biases built from them, are the same in every row unless patches were sampled
        # per row: they stay at batch size P = 1 then and broadcast (B x less work on the (H, S, S) biases).
        pos = self.pos_ln(self.embed_positions(torch.arange(length, device=dev)))[None]  # (1, L, D)
        n_img, img_ids = 0, None
        if patch_images is not None:
            xi, img_pad, img_ids = self.embed_image(patch_images, patch_masks, sample_patch_num, generator)
            n_img = xi.shape[1]
            x = torch.cat([F.dropout(xi, self.dropout, self.training), x], dim=1)
            pad = torch.cat([img_pad, pad], dim=1)
            img_pos = self.image_pos_ln(self.embed_image_positions(img_ids))  # (P, N, D)
            pos = torch.cat([img_pos, pos.expand(img_pos.shape[0], -1, -1)], dim=1)  # (P, S, D)
        x = x * (~pad)[..., None].to(x.dtype)  # (B, S, D)
        abs_bias = _pos_bias(self.pos_q_linear, self.pos_k_linear, pos, pos, cfg.attention_heads, self.pos_scaling)
        ar = torch.arange(length, device=dev)
        tok_bucket = token_bucket_matrix(ar, ar, cfg.token_bucket_size, cfg.max_source_positions)  # (L, L)
        img_bucket = image_rel_bucket(img_ids, img_ids, cfg.image_bucket_size) if n_img else None  # (P, N, N)
        key_pad = pad[:, None, None, :] if bool(pad.any()) else None  # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            bias = abs_bias.clone()  # (P, H, S, S)
            bias[:, :, n_img:, n_img:] += self.token_rel_pos_table_list[i].weight[tok_bucket].permute(2, 0, 1)
            if n_img:
                bias[:, :, :n_img, :n_img] += self.image_rel_pos_table_list[i].weight[img_bucket].permute(0, 3, 1, 2)
            if key_pad is not None:
                bias = bias.masked_fill(key_pad, _mask_value(bias.dtype))  # (B, H, S, S)
            x = layer(x, bias)
        return EncoderOut(self.layer_norm(x), pad, pos.expand(b, -1, -1))


# ----------------------------------------------------------------------------------------------
# Decoder


def _per_row(is_code: torch.Tensor | None, text: torch.Tensor | None, code: torch.Tensor | None) -> torch.Tensor:
    """`code` in the batch rows where `is_code` (B,) is True, `text` in the others.

    `text` / `code` are batch-first (1 or B, ...); the side that no row needs is None and is returned
    as is (not broadcast to B) when the other one is.
    """
    if code is None:
        return text
    if text is None:
        return code
    return torch.where(is_code.view(-1, *([1] * (code.dim() - 1))), code, text)


@dataclass
class DecoderState:
    """KV cache of an incremental decode: one LayerCache per decoder layer, plus the source position keys."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0  # target positions already processed
    cross_pos_k: torch.Tensor | None = None  # (B, H, S, dh) position keys of the source

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam reordering), in place."""
        for cache in self.layers:
            cache.reorder(index)
        if self.cross_pos_k is not None:
            self.cross_pos_k = self.cross_pos_k.index_select(0, index)

    def select(self, index: torch.Tensor) -> DecoderState:
        """A new state of batch rows `index` (repeats allowed: one shared prefix's cache for several
        continuations); this one is left as it is."""
        out = DecoderState([LayerCache(c.self_k, c.self_v, c.cross_k, c.cross_v) for c in self.layers], self.length,
                           self.cross_pos_k)
        out.reorder(index)
        return out


class Decoder(nn.Module):
    """Target tokens + EncoderOut -> vocabulary logits, incrementally with a DecoderState."""

    def __init__(self, cfg: OFAConfig, reg: Regularization, embed_tokens: nn.Embedding):
        super().__init__()
        d, eps, heads = cfg.embed_dim, cfg.layer_norm_eps, cfg.attention_heads
        self.cfg, self.dropout = cfg, reg.dropout
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(d, eps=eps)
        self.code_layernorm_embedding = nn.LayerNorm(d, eps=eps)
        self.embed_positions = nn.Embedding(cfg.max_target_positions + 2, d)
        self.embed_image_positions = nn.Embedding(cfg.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d, eps=eps)
        self.image_pos_ln = nn.LayerNorm(d, eps=eps)
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        self.pos_scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5
        self.layers = nn.ModuleList(DecoderLayer(**_layer_args(cfg, reg), drop_path_rate=r)
                                    for r in linspace(reg.decoder_drop_path, cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=eps)
        self.output_projection = nn.Linear(d, cfg.vocab_size, bias=False)
        self.output_projection.weight = embed_tokens.weight  # tied
        n_img = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(cfg.decoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_img, heads) for _ in range(cfg.decoder_layers))
        self.register_buffer("image_position_idx", decoder_image_position_ids(cfg), persistent=False)

    def forward(self, prev_output_tokens: torch.Tensor, enc: EncoderOut, state: DecoderState | None = None,
                code_masks: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        """Logits (B, Tn, V) for the positions of `prev_output_tokens` (B, T) not yet in `state`.

        Without `state` all T positions are computed (teacher forcing). With a `state`, only the
        positions after `state.length` are run and the cache grows, so step-by-step decoding
        equals the full computation.
        """
        cfg, heads = self.cfg, self.cfg.attention_heads
        b, t = prev_output_tokens.shape
        if t > cfg.max_target_positions + 2:  # <s> + 1024 codes + </s> fit the 1026 position rows
            raise ValueError(f"target length {t} exceeds max_target_positions + 2 = {cfg.max_target_positions + 2}")
        state = state if state is not None else DecoderState()
        start, dev = state.length, prev_output_tokens.device
        if start >= t:
            raise ValueError(f"decoder state already holds {start} positions, got {t} tokens")
        if not state.layers:
            state.layers = [LayerCache() for _ in self.layers]
            state.cross_pos_k = self.cross_pos_k_linear(enc.pos_embed).view(
                enc.pos_embed.shape[0], -1, heads, cfg.head_dim).transpose(1, 2)  # (B, H, S, dh)
        # Text rows and image-code rows differ in positions, embedding layernorm and relative buckets.
        # Each side is computed only if some row needs it; `_per_row` picks it per row in a mixed batch.
        has_code = code_masks is not None and bool(code_masks.any())
        has_text = code_masks is None or not bool(code_masks.all())
        ar = torch.arange(t, device=dev)
        img_ids = self.image_position_idx[:t]
        text_pos = self.pos_ln(self.embed_positions(ar))[None] if has_text else None  # (1, T, D)
        code_pos = self.image_pos_ln(self.embed_image_positions(img_ids))[None] if has_code else None  # (1, T, D)
        pos = _per_row(code_masks, text_pos, code_pos)  # (1|B, T, D)
        pos_new = pos[:, start:]  # (1|B, Tn, D)
        self_abs = _pos_bias(self.self_pos_q_linear, self.self_pos_k_linear, pos_new, pos, heads, self.pos_scaling)
        q = self.cross_pos_q_linear(pos_new).view(pos_new.shape[0], -1, heads, cfg.head_dim).transpose(1, 2)
        cross_bias = (q * self.pos_scaling) @ state.cross_pos_k.transpose(-1, -2)  # (B, H, Tn, S)
        cross_bias = cross_bias.masked_fill(enc.padding_mask[:, None, None, :], _mask_value(cross_bias.dtype))

        rows = ar[start:]
        tok_bucket = token_bucket_matrix(rows, ar, cfg.token_bucket_size, cfg.max_target_positions) if has_text else None  # (Tn, T)
        img_bucket = image_rel_bucket(img_ids[start:], img_ids, cfg.image_bucket_size) if has_code else None  # (Tn, T)
        masked = (ar[None, :] > rows[:, None])[None, None]  # causal (1, 1, Tn, T)
        if bool(prev_output_tokens.eq(cfg.pad_id).any()):
            masked = masked | prev_output_tokens.eq(cfg.pad_id)[:, None, None, :]  # (B, 1, Tn, T)

        x = self.embed_tokens(prev_output_tokens[:, start:])  # (B, Tn, D)
        text_x = self.layernorm_embedding(x) if has_text else None
        code_x = self.code_layernorm_embedding(x) if has_code else None
        x = F.dropout(_per_row(code_masks, text_x, code_x), self.dropout, self.training)  # (B, Tn, D)
        for i, layer in enumerate(self.layers):
            text_rel = self.token_rel_pos_table_list[i].weight[tok_bucket].permute(2, 0, 1)[None] if has_text else None
            code_rel = self.image_rel_pos_table_list[i].weight[img_bucket].permute(2, 0, 1)[None] if has_code else None
            rel = _per_row(code_masks, text_rel, code_rel)  # (1|B, H, Tn, T)
            self_bias = (self_abs + rel).masked_fill(masked, _mask_value(self_abs.dtype))
            x = layer(x, self_bias, cross_bias, state.layers[i], enc.hidden)
        state.length = t
        x = self.layer_norm(x)
        return x if features_only else self.project(x)

    def project(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits (..., V) of hidden states (..., D) through the tied output projection; with
        `columns` (C,) vocabulary ids, only those logits (..., C), in that order."""
        if columns is not None:
            return F.linear(x, self.output_projection.weight[columns])
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference: W @ x^T runs 1.5-4x faster than x @ W^T (MKL's small-M GEMM path), measured in
            # bench/model.py; same numbers up to float rounding.
            w = self.output_projection.weight
            return (w @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], w.shape[0])
        return self.output_projection(x)


# ----------------------------------------------------------------------------------------------
# The model


class OFAModel(nn.Module):
    """OFA encoder-decoder. `forward` returns vocabulary logits (B, T, V) with the official semantics."""

    def __init__(self, config: OFAConfig, regularization: Regularization | None = None):
        super().__init__()
        self.config = config
        reg = regularization or Regularization()
        embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.encoder = Encoder(config, reg, embed)
        self.decoder = Decoder(config, reg, embed)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # BERT-style init of every Linear/Embedding; ResNet convs keep Kaiming, norms ones/zeros.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def encode(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
               patch_masks: torch.Tensor | None = None, **kw) -> EncoderOut:
        return self.encoder(src_tokens, patch_images, patch_masks, **kw)

    def decode(self, prev_output_tokens: torch.Tensor, enc: EncoderOut, state: DecoderState | None = None,
               code_masks: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        return self.decoder(prev_output_tokens, enc, state, code_masks, features_only=features_only)

    def forward(self, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
                patch_masks: torch.Tensor | None = None, prev_output_tokens: torch.Tensor | None = None,
                code_masks: torch.Tensor | None = None, sample_patch_num: int | None = None,
                features_only: bool = False) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) of `prev_output_tokens` (B, T) given the source; with `features_only`
        the decoder's final hidden states (B, T, D) instead (`decoder.project` turns any of them into logits)."""
        if prev_output_tokens is None:
            raise ValueError("prev_output_tokens is required")
        enc = self.encode(src_tokens, patch_images, patch_masks, sample_patch_num=sample_patch_num)
        return self.decoder(prev_output_tokens, enc, None, code_masks, features_only=features_only)

    def num_parameters(self) -> int:
        """Unique parameters (the tied embedding once; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())
