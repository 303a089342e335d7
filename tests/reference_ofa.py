"""An independent, deliberately naive statement of the official OFA forward pass, for parity tests.

It reuses the parameters of an `OFAModel` but none of its code paths: sequence-first (T, B, C)
tensors like fairseq, explicit softmax attention, and the full-size relative-position bucket
matrices built the way the official model builds its buffers (then sliced).
"""

import math

import torch
import torch.nn.functional as F


def official_token_buckets(bucket_size: int, max_position: int) -> torch.Tensor:
    ctx = torch.arange(max_position)[:, None]
    mem = torch.arange(max_position)[None, :]
    rel = ctx - mem
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), mid - 1, torch.abs(rel))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos.le(mid), rel, log_pos.int() * sign).long()
    return bucket + bucket_size - 1


def official_image_buckets(bucket_size: int) -> torch.Tensor:
    n = (2 * bucket_size - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += bucket_size - 1
    rel[:, :, 1] += bucket_size - 1
    rel[:, :, 0] *= 2 * bucket_size - 1
    out = torch.zeros((bucket_size * bucket_size + 1,) * 2, dtype=torch.long)
    out[1:, 1:] = rel.sum(-1)
    out[0, 0:] = n - 3
    out[0:, 0] = n - 2
    out[0, 0] = n - 1
    return out


def _attn(mha, q_in, kv_in, bias, key_pad, causal):
    t, b, c = q_in.shape
    s = kv_in.shape[0]
    h = mha.num_heads
    dh = c // h
    q = mha.q_proj(q_in) * mha.scaling
    k, v = mha.k_proj(kv_in), mha.v_proj(kv_in)
    q = q.contiguous().view(t, b * h, dh).transpose(0, 1)
    k = k.contiguous().view(s, b * h, dh).transpose(0, 1)
    v = v.contiguous().view(s, b * h, dh).transpose(0, 1)
    w = torch.bmm(q, k.transpose(1, 2)) + bias
    if causal:
        w = w + torch.triu(torch.full((t, s), float("-inf")), 1)
    if key_pad is not None:
        w = w.view(b, h, t, s).masked_fill(key_pad[:, None, None, :], float("-inf")).view(b * h, t, s)
    p = torch.softmax(w.float(), dim=-1)
    o = torch.bmm(p, v).transpose(0, 1).contiguous().view(t, b, h, dh)
    o = torch.einsum("tbhd,h->tbhd", o, mha.c_attn).reshape(t, b, c)
    return mha.out_proj(o)


def _ffn(layer, x):
    r = x
    x = layer.final_layer_norm(x)
    x = layer.ffn_layernorm(F.gelu(layer.fc1(x)))
    return r + layer.fc2(x)


@torch.no_grad()
def reference_logits(model, src_tokens, patch_images, patch_masks, prev_output_tokens):
    cfg = model.config
    enc, dec = model.encoder, model.decoder
    heads, bsz, length = cfg.attention_heads, src_tokens.shape[0], src_tokens.shape[1]
    tok_rp = official_token_buckets(cfg.token_bucket_size, cfg.max_source_positions)
    img_rp = official_image_buckets(cfg.image_bucket_size)

    feats = enc.embed_images(patch_images)
    hh, ww = feats.shape[-2:]
    image_embed = feats.flatten(2).transpose(1, 2)
    n = image_embed.shape[1]
    img_idx = (torch.arange(ww)[None, :].expand(hh, ww) + torch.arange(hh)[:, None] * cfg.image_bucket_size + 1).reshape(-1)
    x = enc.layernorm_embedding(enc.embed_tokens(src_tokens) + enc.type_embedding(torch.zeros_like(src_tokens)))
    xi = enc.image_proj(image_embed)
    xi = enc.patch_layernorm_embedding(xi + enc.type_embedding(torch.ones(bsz, n, dtype=torch.long)))
    x = torch.cat([xi, x], dim=1)
    pad = torch.cat([(~patch_masks)[:, None].expand(bsz, n), src_tokens.eq(cfg.pad_id)], dim=1)
    x = x * (1 - pad.unsqueeze(-1).type_as(x))
    x = x.transpose(0, 1)
    pos = enc.pos_ln(enc.embed_positions(torch.arange(length)[None].expand(bsz, length)))
    ipos = enc.image_pos_ln(enc.embed_image_positions(img_idx[None].expand(bsz, n)))
    pos = torch.cat([ipos, pos], dim=1)
    tot = pos.shape[1]
    dh = cfg.head_dim
    s = (dh * cfg.attn_scale_factor) ** -0.5
    pq = enc.pos_q_linear(pos).view(bsz, tot, heads, dh).transpose(1, 2) * s
    pk = enc.pos_k_linear(pos).view(bsz, tot, heads, dh).transpose(1, 2)
    abs_bias = pq @ pk.transpose(2, 3)
    for i, layer in enumerate(enc.layers):
        bias = abs_bias.clone()
        rp = tok_rp[:length, :length]
        bias[:, :, -length:, -length:] += F.embedding(rp, enc.token_rel_pos_table_list[i].weight).permute(2, 0, 1)
        irp = img_rp[img_idx][:, img_idx]
        bias[:, :, :n, :n] += F.embedding(irp, enc.image_rel_pos_table_list[i].weight).permute(2, 0, 1)
        bias = bias.reshape(-1, tot, tot)
        r = x
        h = layer.attn_ln(_attn(layer.self_attn, layer.self_attn_layer_norm(x), layer.self_attn_layer_norm(x),
                                bias, pad, False))
        x = _ffn(layer, r + h)
    enc_out = enc.layer_norm(x)  # (S, B, C)

    t = prev_output_tokens.shape[1]
    tpos = dec.embed_positions(torch.arange(t)[None].expand(bsz, t))
    tpos_n = dec.pos_ln(tpos)
    sq = dec.self_pos_q_linear(tpos_n).view(bsz, t, heads, dh).transpose(1, 2) * s
    sk = dec.self_pos_k_linear(tpos_n).view(bsz, t, heads, dh).transpose(1, 2)
    self_abs = sq @ sk.transpose(2, 3)
    cq = dec.cross_pos_q_linear(tpos_n).view(bsz, t, heads, dh).transpose(1, 2) * s
    ck = dec.cross_pos_k_linear(pos).view(bsz, tot, heads, dh).transpose(1, 2)
    cross = (cq @ ck.transpose(2, 3)).reshape(-1, t, tot)
    y = dec.layernorm_embedding(dec.embed_tokens(prev_output_tokens)).transpose(0, 1)
    tpad = prev_output_tokens.eq(cfg.pad_id)
    tpad = tpad if bool(tpad.any()) else None
    for i, layer in enumerate(dec.layers):
        bias = self_abs + F.embedding(tok_rp[:t, :t], dec.token_rel_pos_table_list[i].weight).permute(2, 0, 1)[None]
        bias = bias.reshape(-1, t, t)
        r = y
        h = layer.self_attn_layer_norm(y)
        y = r + layer.self_attn_ln(_attn(layer.self_attn, h, h, bias, tpad, True))
        r = y
        h = layer.encoder_attn_layer_norm(y)
        y = r + layer.cross_attn_ln(_attn(layer.encoder_attn, h, enc_out, cross, pad, False))
        y = _ffn(layer, y)
    y = dec.layer_norm(y).transpose(0, 1)
    return F.linear(y, dec.embed_tokens.weight)
