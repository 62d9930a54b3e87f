"""A decoding step computed from a Llama-family model's weights, for decoding over a shared prompt.

A decoding step of a small model runs a few hundred small operations: on the embedded model (4 layers
of 128 features) one step of 64 rows is about 1.5 ms of matrix products and 3 ms of everything else,
most of it the dispatch of transformers' modules (each projection, norm and rotary embedding a module
call, the cache's bookkeeping, the attention interface). ``DecodeStep`` computes the same step directly:
the query, key and value projections as one product, gate and up as one, the rotary embedding once
per step from the model's own ``rotary_emb``, and the attention over the group's prompt and the row's own
completion with few operations (``DecodeStep._attend``): each row keeps its slot of the prompt's
[groups x width] layout, so that the scores against a group's prompt are one batched product over all of
its queries, a row leaving the batch moves no memory, and the completion's keys and values are stored
step-major (a step reads them contiguously). Its logits are the model's up to
rounding (the fused products sum in another order), checked at start-up on a made-up batch
(``decoding_problem``) and by ``tests/test_decoding.py``.

Only for decoder layers whose forward is the Llama template (``SUPPORTED``: Llama, Qwen2, Mistral;
SmolLM2 is Llama), every projection a plain ``nn.Linear`` (not quantized, not a LoRA layer), and
a model switched to ``attention.NAME``; anything else decodes through the model's forward.
"""
from __future__ import annotations

from typing import Optional

import torch

from grpo_scale import attention

# decoder layer, attention, MLP and norm classes whose forwards DecodeStep reproduces
SUPPORTED = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm"),
}
_FLAG = "_grpo_scale_decode_step"
# q/k/v and gate/up weights are concatenated (one product each) when all of these copies together are
# at most this size: the embedded model's are 3 MB; SmolLM2-135M's would be 276 MB (copied for every
# generate call), so its products stay separate
FUSE_MAX_BYTES = 64 << 20
# the attention over a row's own completion runs as elementwise products and sums on the CPU while the
# products have at most this many elements (an in-process A/B of the embedded model's generation: ~3%
# faster than one batched product per row), as a batched product otherwise
ELEMENTWISE_MAX = 1 << 22
# the slot layout is rebuilt on the groups with live rows once they fill at most this share of the slots
COMPACT_AT = 0.75


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of ``x`` (its ``rotate_half``: element i paired with i + half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def template_problem(model) -> Optional[str]:
    """None when ``model`` (a plain transformers model) is of a class in ``SUPPORTED`` and uses
    ``attention.NAME``, else why not. Its layers are checked with ``template_layer``."""
    kind = type(model).__name__
    if kind not in SUPPORTED:
        return f"its class {kind} is not one of {', '.join(sorted(SUPPORTED))}"
    if not attention.enabled(model):
        return f"it does not use {attention.NAME}"
    return None


def template_layer(model, layer) -> bool:
    """Whether ``layer`` is ``model``'s class's decoder layer with its own attention, MLP and norms (whose
    forwards DecodeStep and last_layer reproduce)."""
    layer_cls, attn_cls, mlp_cls, norm_cls = SUPPORTED[type(model).__name__]
    return (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__,
            type(layer.input_layernorm).__name__, type(layer.post_attention_layernorm).__name__) == \
        (layer_cls, attn_cls, mlp_cls, norm_cls, norm_cls)


def supported(model) -> Optional[str]:
    """None when ``DecodeStep`` can compute ``model``'s decoding steps (a plain transformers model, not a
    peft or DeepSpeed wrapper), else why not."""
    why = template_problem(model)
    if why is not None:
        return why
    decoder = model.model
    if type(decoder.norm).__name__ != SUPPORTED[type(model).__name__][3] or type(model.lm_head) is not torch.nn.Linear:
        return "its final norm or output layer is not the plain one"
    if getattr(model.config, "pretraining_tp", 1) not in (None, 1):
        return "its config sets pretraining_tp"
    for i, layer in enumerate(decoder.layers):
        if not template_layer(model, layer):
            return f"layer {i} is not {SUPPORTED[type(model).__name__][0]} with its own attention, MLP and norms"
        a, m = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        if any(type(p) is not torch.nn.Linear for p in linears):
            return f"layer {i} has projections that are not plain nn.Linear (quantized or adapters)"
    return None


def enable(model) -> None:
    setattr(model, _FLAG, True)


def disable(model) -> None:
    if hasattr(model, _FLAG):
        delattr(model, _FLAG)


def enabled(model) -> bool:
    return getattr(model, _FLAG, False) and supported(model) is None


def _bias_or_zero(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


class DecodeStep:
    """The decoding steps of ``model`` over ``prefix`` (an ``attention.PrefixKV`` of the prompts), for
    ``rows`` rows and at most ``room`` steps: ``step(tokens [B], positions [B])`` returns the logits
    [B, V] of the next token; ``select(live)`` keeps the rows ``live`` (the same call as the prefix's).
    The weights are read (and the fused ones copied) when it is built, so it is built for each
    ``generate`` call, after the weights last changed."""

    def __init__(self, model, prefix: attention.PrefixKV, rows: int, room: int):
        from grpo_scale.rollout import FEW_ROWS_MIN_WEIGHT, linear

        self._linear = linear
        self._few_rows_min = FEW_ROWS_MIN_WEIGHT
        cfg = model.config
        decoder = model.model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
        self.head = (model.lm_head.weight, model.lm_head.bias, self._few_rows(model.lm_head.weight))
        first = decoder.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.layers = []
        w = first.q_proj.weight
        # q/k/v and gate/up fused into one product each where the fused copies are small (the copies are
        # made for every generate call); separate products otherwise
        fused_bytes = sum(p.weight.numel() * p.weight.element_size() for layer in decoder.layers for p in
                          (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj))
        self.fused = fused_bytes <= FUSE_MAX_BYTES
        for layer in decoder.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                norm1=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                qkv=self._parts(a.q_proj, a.k_proj, a.v_proj),
                o=(a.o_proj.weight, a.o_proj.bias, self._few_rows(a.o_proj.weight)),
                norm2=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                gate_up=self._parts(m.gate_proj, m.up_proj),
                down=(m.down_proj.weight, m.down_proj.bias, self._few_rows(m.down_proj.weight)),
                act=m.act_fn, intermediate=m.gate_proj.out_features))
        # the attention's layout (see ``_attend``): each row keeps its slot of the [groups x width] layout
        # of the prefix (``PrefixKV.flat`` before any row left), so rows leaving the batch move no memory
        G, W, Hkv, D = prefix.groups, prefix.width, self.kv_heads, self.head_dim
        if prefix.group.numel() != rows:
            raise ValueError(f"DecodeStep: {rows} rows, but the prefix holds {prefix.group.numel()}")
        self.groups, self.width = G, W
        self.slot = prefix.flat.clone()
        self.group = prefix.group.clone()            # each row's group
        self.full = prefix.full                      # every slot holds a live row: rows are the slots
        self._prefix(prefix.keys, prefix.values, prefix.bias)
        # the completions' keys and values, step-major: a step's reads are contiguous
        shape = (room, G * W, Hkv, D)
        self.keys = [w.new_empty(shape) for _ in self.layers]
        self.values = [w.new_empty(shape) for _ in self.layers]
        self.filled = 0

    def _prefix(self, keys: list, values: list, bias: torch.Tensor) -> None:
        """The prompts' keys and values [G, Hkv, P, D] per layer and their bias [G, 1, 1, P], laid out for
        ``_attend``."""
        G, Hkv, D = self.groups, self.kv_heads, self.head_dim
        self._prefix_4d = (keys, values, bias)
        self.prefix_keys = [k.reshape(G * Hkv, -1, D).transpose(1, 2) for k in keys]       # [G*Hkv, D, P]
        self.prefix_values = [v.reshape(G * Hkv, -1, D) for v in values]                  # [G*Hkv, P, D]
        self.prefix_bias = bias.expand(G, Hkv, 1, -1).reshape(G * Hkv, 1, -1)            # [G*Hkv, 1, P]
        self.queries = None                          # [G * W, H, D]: the slots' queries, once a slot is empty

    def _parts(self, *linears: torch.nn.Linear) -> list:
        """The (weight, bias, few-row orientation) products whose outputs, concatenated, are the linears'
        outputs: one fused product, or one per linear."""
        if not self.fused:
            return [(p.weight, p.bias, self._few_rows(p.weight)) for p in linears]
        bias = None
        if any(p.bias is not None for p in linears):
            bias = torch.cat([_bias_or_zero(p) for p in linears])
        # the orientation is the linears' own (rollout.few_row_linears' rule on each), not the fused size's
        return [(torch.cat([p.weight for p in linears]), bias, all(self._few_rows(p.weight) for p in linears))]

    def _few_rows(self, weight: torch.Tensor) -> bool:
        return weight.numel() >= self._few_rows_min

    def _projs(self, x: torch.Tensor, parts: list) -> torch.Tensor:
        outs = [self._proj(x, wb) for wb in parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _proj(self, x: torch.Tensor, product) -> torch.Tensor:
        weight, bias, few_rows = product
        if few_rows:  # the orientation rollout.few_row_linears gives the model's own linear
            return self._linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def _rms(x: torch.Tensor, weight_eps) -> torch.Tensor:  # transformers' Llama RMSNorm
        weight, eps = weight_eps
        if x.dtype == weight.dtype == torch.float32:  # the same computation as one operation
            return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def select(self, live: torch.Tensor) -> None:
        """Keeps the rows ``live`` (in order). Once the groups that still have rows, at the width of the
        fullest, fill at most ``COMPACT_AT`` of the slots, the layout is rebuilt on them (the filled steps of
        the live rows' keys and values copied once), so that the last steps of a batch whose rows mostly
        finished attend over few slots."""
        self.slot, self.group = self.slot[live], self.group[live]
        B = self.slot.numel()
        self.full = self.full and B == self.groups * self.width
        if B == 0 or self.full:
            return
        counts = torch.bincount(self.group, minlength=self.groups)
        kept = (counts > 0).nonzero().squeeze(1)
        width = int(counts.max())
        if kept.numel() * width > COMPACT_AT * self.groups * self.width:
            return
        counts = counts[kept]
        group = torch.searchsorted(kept, self.group)                                          # new group of each row
        slot = group * width + torch.arange(B, device=group.device) - (counts.cumsum(0) - counts)[group]
        S = self.filled
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(old.shape[0], kept.numel() * width, *old.shape[2:])
                new[:S].index_copy_(1, slot, old[:S].index_select(1, self.slot))
                buffers[i] = new
        keys, values, bias = self._prefix_4d
        self.groups, self.width, self.slot, self.group = kept.numel(), width, slot, group
        self._prefix([k.index_select(0, kept) for k in keys], [v.index_select(0, kept) for v in values],
                     bias.index_select(0, kept))
        self.full = B == self.groups * self.width

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
        """Layer ``i``'s attention at step ``t``: queries ``q`` [B, H, D] (scaled), the step's keys and values
        [B, Hkv, D] (stored here). Returns [B, H * D]. The work runs on the slots of the prefix's
        [groups x width] layout (a slot whose row has left computes a throw-away row): the scores against
        each group's prompt are one batched product per group and key head over all of its queries, those
        against a row's own completion by products and sums over its slot, and both go through one softmax."""
        G, W, H, Hkv, D = self.groups, self.width, self.heads, self.kv_heads, self.head_dim
        n_rep, S, GW = H // Hkv, t + 1, G * W
        keys, values = self.keys[i], self.values[i]
        if self.full:
            keys[t].copy_(k)
            values[t].copy_(v)
        else:
            keys[t].index_copy_(0, self.slot, k)
            values[t].index_copy_(0, self.slot, v)
            if self.queries is None:
                self.queries = q.new_zeros(GW, H, D)
            q = self.queries.index_copy_(0, self.slot, q)
        grouped = q.view(G, W, Hkv, n_rep, D).permute(0, 2, 3, 1, 4).reshape(G * Hkv, n_rep * W, D)
        prompt = torch.baddbmm(self.prefix_bias, grouped, self.prefix_keys[i])                # [G*Hkv, n_rep*W, P]
        P = prompt.shape[-1]
        # a row's own keys: on the CPU, while the products are small, products and sums (a batched product
        # of one query each is slower there); else the batched product
        small = q.device.type == "cpu" and S * GW * H * D <= ELEMENTWISE_MAX
        if small:
            own = (keys[:S].view(S, GW * Hkv, 1, D) * q.view(1, GW * Hkv, n_rep, D)).sum(-1).permute(1, 2, 0)
        else:
            own = torch.bmm(q.view(GW * Hkv, n_rep, D), keys[:S].view(S, GW * Hkv, D).permute(1, 2, 0))
        scores = torch.cat([prompt.view(G, Hkv, n_rep, W, P),                                 # [G, Hkv, n_rep, W, P+S]
                            own.view(G, W, Hkv, n_rep, S).permute(0, 2, 3, 1, 4)], dim=-1)
        w = scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        out = torch.bmm(w.view(G * Hkv, n_rep * W, P + S)[..., :P], self.prefix_values[i])    # [G*Hkv, n_rep*W, D]
        if small:
            mine = (w[..., P:].permute(4, 0, 3, 1, 2).reshape(S, GW * Hkv, n_rep, 1)
                    * values[:S].view(S, GW * Hkv, 1, D)).sum(0)                              # [GW*Hkv, n_rep, D]
        else:
            mine = torch.bmm(w[..., P:].permute(0, 3, 1, 2, 4).reshape(GW * Hkv, n_rep, S),
                             values[:S].view(S, GW * Hkv, D).transpose(0, 1))
        out = (mine.view(G, W, Hkv, n_rep, D) + out.view(G, Hkv, n_rep, W, D).permute(0, 3, 1, 2, 4)).reshape(GW, H * D)
        return out if self.full else out.index_select(0, self.slot)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, H, Hkv, D = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        t = self.filled
        if t >= self.keys[0].shape[0]:
            raise RuntimeError(f"DecodeStep: built for {t} steps, asked for one more")
        h = self.embed(tokens)                                                    # [B, E]
        cos, sin = self.rotary(h[:, None], positions.view(B, 1))                  # [B, 1, D]
        for i, layer in enumerate(self.layers):
            x = self._rms(h, layer["norm1"])
            qkv = self._projs(x, layer["qkv"])
            qk = qkv[:, :(H + Hkv) * D].view(B, H + Hkv, D)
            qk = rotate(qk, cos, sin)
            out = self._attend(i, qk[:, :H] * self.scaling, qk[:, H:], qkv[:, (H + Hkv) * D:].view(B, Hkv, D), t)
            h = h + self._proj(out, layer["o"])
            x = self._rms(h, layer["norm2"])
            gate, up = self._projs(x, layer["gate_up"]).split(layer["intermediate"], dim=-1)
            h = h + self._proj(layer["act"](gate) * up, layer["down"])
        self.filled = t + 1
        return self._proj(self._rms(h, self.norm), self.head)


def decoding_problem(model, vocab: int, tol: Optional[float] = None) -> Optional[str]:
    """Why ``DecodeStep``'s logits differ from ``model``'s forward over the same ``attention.PrefixKV``, on
    the made-up batch of ``rollout.made_up_decoding``; None when they agree up to rounding (``tol``: see
    ``rollout.logits_differ``)."""
    from grpo_scale.rollout import logits_differ, made_up_decoding

    why = supported(model)
    if why is not None:
        return why
    want = made_up_decoding(model, vocab, "prefix")
    if want is None:
        return "it returns no KV cache"
    return logits_differ(made_up_decoding(model, vocab, "weights"), want, model, "the model's forward", tol)
