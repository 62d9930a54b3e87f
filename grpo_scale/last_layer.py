"""The last decoder layer of a packed forward, at the positions whose outputs are used.

A packed forward (``packing`` with ``attention.Segments``) uses the decoder's output only where it
predicts a completion token: each prompt's last token and the completions' tokens. Every layer but the
last runs at every prompt position, since the completions attend to the prompt's keys and values in
every layer; but the last layer's prompt positions feed nothing except their own keys and values. On
the embedded model the prompts are about 45% of a step's tokens, and the last layer a quarter of the
work.

``enable`` gives the last decoder layer of a Llama-template model (``decoding.SUPPORTED``: Llama, Qwen2,
Mistral) a forward that, when its attention is asked for ``segments``, computes the keys and values at
every position and everything else (query, attention, output projection, MLP) at ``Segments.keep``
alone; its output is zero at the other positions, which nothing reads (``Packed.gather`` picks used
positions only). Any other call runs the layer's own forward. It calls the layer's own modules, so LoRA
adapters, ZeRO-3's parameter hooks and gradient checkpointing apply as in the full forward. The trainer
checks it at start-up with the packed forward against the padded one (``GRPOTrainer._packing_fits``);
``tests/test_last_layer.py`` checks outputs and every gradient against the full layer.

The same holds for the prefill before decoding over a shared prompt (``rollout.prefill`` with
``keys_values_only``): only the cache is read, so the last layer computes its keys and values alone
(``keys_values``); checked with the decoding steps (``decoding.decoding_problem``).
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from grpo_scale import attention
from grpo_scale.decoding import SUPPORTED, rotate, template_layer, template_problem

_FLAG = "_grpo_scale_used_positions"
# the keyword argument of a model's forward that asks the last layer for its cache only (``keys_values``)
KEYS_VALUES_ONLY = attention.KEYS_VALUES_ONLY


def _base(model):
    """The transformers model inside a peft or DeepSpeed wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> Optional[str]:
    """None when ``enable`` can give ``model``'s last layer the used-positions forward, else why not."""
    base = _base(model)
    why = template_problem(base)
    if why is not None:
        return why
    if not template_layer(base, base.model.layers[-1]):
        return f"its last layer is not {SUPPORTED[type(base).__name__][0]} with its own attention, MLP and norms"
    return None


def enable(model) -> bool:
    """Gives ``model``'s last decoder layer the used-positions forward where ``supported``; returns whether
    it has it."""
    if supported(model) is not None:
        return False
    layer = _base(model).model.layers[-1]
    if not getattr(layer, _FLAG, False):
        layer.forward = types.MethodType(_forward, layer)
        setattr(layer, _FLAG, True)
    return True


def disable(model) -> None:
    layers = getattr(getattr(_base(model), "model", None), "layers", None)
    if layers is not None and getattr(layers[-1], _FLAG, False):
        del layers[-1].forward
        delattr(layers[-1], _FLAG)


def enabled(model) -> bool:
    layers = getattr(getattr(_base(model), "model", None), "layers", None)
    return layers is not None and getattr(layers[-1], _FLAG, False)


def _forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
             use_cache=False, position_embeddings=None, **kwargs):
    if kwargs.pop(KEYS_VALUES_ONLY, False) and past_key_values is not None:
        return keys_values(self, hidden_states, position_embeddings, past_key_values)
    segments = kwargs.get("segments")
    if segments is None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
    return used_positions(self, hidden_states, position_embeddings, segments, past_key_values)


def _heads(attn) -> tuple[int, int, int]:
    """The attention module's query heads, key/value heads and head size."""
    H = attn.config.num_attention_heads
    return H, H // attn.num_key_value_groups, attn.head_dim


def used_positions(layer, hidden: torch.Tensor, position_embeddings, segments: attention.Segments,
                   cache=None) -> torch.Tensor:
    """A Llama-template decoder ``layer`` on packed rows ``hidden`` [R, L, E], computed at ``segments.keep``
    only (keys and values everywhere); zero at the other positions."""
    attn = layer.self_attn
    R, L, E = hidden.shape
    H, Hkv, D = _heads(attn)
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(R, L, Hkv, D)
    v = attn.v_proj(x).view(R, L, Hkv, D)
    cos, sin = position_embeddings                                                      # [R, L, D]
    k = rotate(k, cos.unsqueeze(2), sin.unsqueeze(2))
    if cache is not None:  # as the full forward leaves it (a packed forward starts from an empty cache)
        cache.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)
    slots = segments.tail_index
    q = attn.q_proj(x.reshape(R * L, E).index_select(0, slots)).view(-1, H, D)
    q = rotate(q, cos.reshape(R * L, 1, D)[slots], sin.reshape(R * L, 1, D)[slots])
    out = attention.tail_attention(q, k.view(R * L, Hkv, D), v.view(R * L, Hkv, D), segments, attn.scaling,
                                   attn.attention_dropout if attn.training else 0.0)      # [K, H, D]
    flat = hidden.reshape(R * L, E)
    mid = flat.index_select(0, segments.keep) + attn.o_proj(out.reshape(-1, H * D))
    done = mid + layer.mlp(layer.post_attention_layernorm(mid))
    return flat.new_zeros(R * L, E).index_copy(0, segments.keep, done).view(R, L, E)


def keys_values(layer, hidden: torch.Tensor, position_embeddings, cache) -> torch.Tensor:
    """A Llama-template decoder ``layer``'s keys and values of ``hidden`` [B, L, E], stored in ``cache`` as its
    own forward stores them; returns ``hidden`` unchanged. For a prefill whose outputs are not read (the
    prompt's last token is decoded after it): the model's logits from such a forward are not its own."""
    attn = layer.self_attn
    B, L, _ = hidden.shape
    _, Hkv, D = _heads(attn)
    x = layer.input_layernorm(hidden)
    cos, sin = position_embeddings
    k = rotate(attn.k_proj(x).view(B, L, Hkv, D), cos.unsqueeze(2), sin.unsqueeze(2))
    cache.update(k.transpose(1, 2), attn.v_proj(x).view(B, L, Hkv, D).transpose(1, 2), attn.layer_idx)
    return hidden
