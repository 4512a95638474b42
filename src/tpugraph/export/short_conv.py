"""LFM2's gated short convolution -> static-shape segments whose conv state is an explicit input/output.

A short-convolution layer carries one state instead of a KV cache: the last K inputs of its depthwise causal
conv (``conv_state`` [1, H, K], K = config.conv_L_cache), the conv's input being B * x of the layer's in_proj.

- Prefill ``block_i``: (input_states [1,SEQ,H], attention_mask) -> (hidden_states, next_conv_state). The state
  starts at zero; the conv is causal, so the pad rows after the prompt change no prompt row, and the next
  state is the last K prompt columns (zero-padded on the left when n < K), picked by the same one-hot MatMul
  as the gated-DeltaNet prefill (export/linear_attention.py: the mask's diagonal tells the prompt rows).
- Decode ``block_cache_i``: (input_states [1,1,H], conv_state) -> (hidden_states, next_conv_state): the state
  shifted by one column with the new input appended, and the conv as a product with the kernel summed over K.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from ..errors import ModelError
from .linear_attention import StateCapture, causal_conv_with_state


def _short_conv_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Lfm2ShortConv.forward with static shapes; the conv state through ``cache`` (a StateCapture)."""
    if not isinstance(cache, StateCapture):
        raise ModelError("the static short-convolution layer runs only inside tpugraph's state segments")
    seq = int(hidden_states.shape[1])
    bcx = self.in_proj(hidden_states).transpose(-1, -2)  # [1, 3H, S]
    b, c, x = bcx.chunk(3, dim=-2)
    bx = b * x  # [1, H, S]
    conv = causal_conv_with_state(bx, self.conv.weight.squeeze(1), self.conv.bias, cache, seq)
    y = (c * conv).transpose(-1, -2).contiguous()
    return self.out_proj(y)


_SHORT_CONV_PARTS = ("in_proj", "conv", "out_proj")


def rewrite_short_conv(layer: nn.Module, config: Any) -> None:
    """Replace a short-convolution layer's forward (the exporter's own copy) by the static one; an attention
    layer of the same model is left as transformers made it."""
    conv = getattr(layer, "conv", None)
    if conv is None:
        return
    missing = [p for p in _SHORT_CONV_PARTS if not hasattr(conv, p)]
    inner = getattr(conv, "conv", None)
    if missing or not isinstance(inner, nn.Conv1d) or inner.groups != inner.in_channels \
            or inner.in_channels != inner.out_channels:
        raise ModelError(f"{type(conv).__name__}: the static short-convolution rewrite expects in_proj, a depthwise "
                         f"conv and out_proj{'; missing ' + ', '.join(missing) if missing else ''}; this layer differs")
    conv.forward = types.MethodType(_short_conv_forward, conv)
