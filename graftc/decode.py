"""Decode state of grafted operators, kept in transformers' own cache layers.

A grafted decoder layer still receives the model's `Cache` in `generate()`; its operator takes its entry in
that cache (`graftc.site.Call.state`) and replaces the teacher's full KV layer there, the first time, with the
kind of state it needs:

* `WindowKV` — transformers' sliding-window KV layer (memory O(window)), which also remembers which of the
  cached keys are padding, so a left-padded prompt stays masked while it is inside the window;
* `RecurrentState` — transformers' layer for conv and recurrent states (O(1) per token: the last kernel-1
  inputs of each short convolution, a state matrix), which also counts the tokens it has seen, so the cache's
  length, and the masks the model builds from it, stay right even when no layer keeps KV.

The model's config keeps the teacher's `layer_types`: transformers models index their masks by those names
(Qwen3 builds only "full_attention"/"sliding_attention" masks), so new names there would break the forward.
Which layer holds which state is recorded in `config.graftc_layers` instead (`graftc.site.record_layers`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer


class WindowKV(DynamicSlidingWindowLayer):
    """Keys/values of the last `window` tokens (and the new ones), with a validity flag per cached key."""

    def __init__(self, window: int):
        super().__init__(sliding_window=window + 1)  # transformers keeps sliding_window - 1 past tokens
        self.valid: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        """Add the new tokens' keys/values [B, H, Q, dh] and validity [B, Q]; returns the keys, values and
        validity of everything the new tokens may see (the kept past, then the new tokens)."""
        past = self.valid if self.valid is not None else valid[:, :0]
        seen = torch.cat([past, valid], 1)
        keys, values = self.update(keys, values)
        self.valid = seen[:, -(self.sliding_window - 1):] if self.sliding_window > 1 else seen
        return keys, values, seen

    def reset(self) -> None:
        super().reset()
        self.valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices, ...]


class RecurrentState(LinearAttentionAndFullAttentionLayer):
    """Conv states (the last taps-1 inputs of a short convolution, [B, taps-1, C]) and recurrent states (any
    tensor), numbered per operator; no per-token KV. `seen` counts tokens: the operator adds each call's."""

    def __init__(self, replaced=None, number_of_states: int = 2):
        super().__init__(number_of_states=number_of_states)
        self.seen = 0
        # In a static cache the model's masks span every slot: answer for masks as the static layer replaced would
        self.max_cache_len = getattr(replaced, "max_cache_len", None)
        # ... and keep the cache as compileable as it was: transformers drops the mask of a one-token step (and
        # lets SDPA's is_causal stand in) unless the cache is, which a static layer's empty slots cannot survive
        self.is_compileable = bool(getattr(replaced, "is_compileable", False))

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.max_cache_len or self.seen + query_length), 0

    def reset(self) -> None:
        super().reset()
        self.seen = 0

    def conv_window(self, x: torch.Tensor, index: int, taps: int) -> torch.Tensor:
        """x [B, Q, C] (new inputs of short convolution `index`) preceded by the taps-1 inputs before them (zeros
        where the sequence starts), so the convolution's outputs for the new tokens can be computed; the last
        taps-1 rows are kept for the next step."""
        keep = max(taps - 1, 1)
        if self.is_conv_states_initialized[index]:
            past = self.conv_states[index]
        else:
            past = x.new_zeros(x.shape[0], keep, x.shape[-1])
            self.is_conv_states_initialized[index] = True
        full = torch.cat([past, x], 1)
        self.conv_states[index] = full[:, -keep:].clone()  # not a view: a long prompt's inputs are freed
        return full

    def _each_state(self, change) -> None:
        for states in (self.conv_states, self.recurrent_states):
            for i, t in states.items():
                if t is not None:
                    states[i] = change(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each_state(lambda t: t[indices, ...])

    def recurrent(self, index: int) -> torch.Tensor | None:
        return self.recurrent_states[index] if self.is_recurrent_states_initialized[index] else None

    def set_recurrent(self, index: int, state: torch.Tensor) -> None:
        if self.is_recurrent_states_initialized[index]:
            self.recurrent_states[index].copy_(state)
        else:
            self.recurrent_states[index] = state.clone()
            self.is_recurrent_states_initialized[index] = True
