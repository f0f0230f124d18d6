"""The native CPU decode step: a ZooForCausalLM whose layers are all softmax attention with
SwiGLU or GELU FFNs and RMSNorm (Llama, SmolLM2, attention-tiny) decodes through
`zoo.kernels.transformer_decode_step`, one C++ call per token, in place of the torch.compile'd
step. Same arguments and results as `compiled_decode_step`'s step (the cache as tensors and
ints); logits equal the model's own up to summation order (float32).

    support = native_support(model, layout, batch_size)   # truthy where the step applies
    step = native_decode_step(model, layout, greedy)        # else support.reason says why not
    logits_or_tokens, tensors, ints = step(ids, tensors, ints)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from zoo.cache import CacheLayout
from zoo.kernels import transformer_step
from zoo.layers.attention import Attention, AttentionState
from zoo.layers.ffn import MLP, SwiGLU
from zoo.layers.norms import RMSNorm
from zoo.model import ZooForCausalLM

# Beyond this many rows a step is a matrix product, which BLAS does better than row dots.
MAX_NATIVE_BATCH = 16

NativeStep = Callable[
    [torch.Tensor, list[torch.Tensor], list[int]],
    tuple[torch.Tensor, list[torch.Tensor], list[int]],
]


@dataclasses.dataclass(frozen=True)
class NativeSupport:
    """Whether a model takes the native step (truthy when it does) and, when not, why."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def native_support(model: ZooForCausalLM, layout: CacheLayout, batch_size: int) -> NativeSupport:
    """Whether `model` can take the native step with this cache layout and batch size."""
    reason = _why_not_native(model, layout, batch_size)
    return NativeSupport(ok=reason is None, reason=reason or "")


def _why_not_native(model: ZooForCausalLM, layout: CacheLayout, batch_size: int) -> str | None:
    """The first check `model` fails, or None where it passes them all."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}; the native step runs on the CPU"
    if weight.dtype not in transformer_step.KERNEL_DTYPES:
        return f"its weights are {weight.dtype}; the native step takes float32, bfloat16, float16"
    if any(p.dtype != weight.dtype for p in model.parameters()):
        return "its parameters mix dtypes"
    if batch_size > MAX_NATIVE_BATCH:
        return f"batch {batch_size} > {MAX_NATIVE_BATCH} rows (a matrix product: BLAS's work)"
    if model.lm_head.bias is not None:
        return "the output head has a bias"
    backbone = model.model
    norms = [backbone.norm, backbone.embed_norm] + [
        n for block in backbone.layers for n in (block.mixer_norm, block.ffn_norm)]
    if any(n is not None and not isinstance(n, RMSNorm) for n in norms):
        return f"norm={model.config.norm!r}: the native step has RMSNorm only"
    if len({n.eps for n in norms if n is not None}) > 1:
        return "its norms differ in eps"
    first = backbone.layers[0].mixer
    ffn_kinds = set()
    for i, block in enumerate(backbone.layers):
        mixer = block.mixer
        if type(mixer) is not Attention:
            return (f"layer {i}'s mixer is {type(mixer).__name__}; the native step has "
                    "attention only")
        if mixer.window is not None:
            return f"layer {i}'s attention has a window"
        shape = (mixer.n_heads, mixer.n_kv_heads, mixer.head_dim)
        if shape != (first.n_heads, first.n_kv_heads, first.head_dim):
            return f"layer {i}'s attention heads differ from layer 0's"
        if (mixer.rotary is None) != (first.rotary is None) or (
            mixer.rotary is not None and mixer.rotary.theta != first.rotary.theta
        ):
            return f"layer {i}'s rotary embedding differs from layer 0's"
        if block.ffn is not None and type(block.ffn) not in (SwiGLU, MLP):
            return f"layer {i}'s FFN is {type(block.ffn).__name__}; native: swiglu or mlp"
        ffn_kinds.add(type(block.ffn))
        if layout.layers[i] is None or layout.layers[i][0] is None or (
            layout.layers[i][0][0] is not AttentionState or layout.layers[i][1] is not None
        ):
            return f"layer {i}'s cache is not a KV cache alone"
    if len(ffn_kinds - {None}) > 1:
        return "its layers mix SwiGLU and MLP FFNs"
    if first.head_dim % 2 or first.head_dim > 512:
        return f"head_dim={first.head_dim}: the native step takes even head dims up to 512"
    if not all(p.is_contiguous() for p in model.parameters()):
        return "a weight is not contiguous"
    if not transformer_step.load():
        return "the C++ kernel did not build (see the warning; ZOO_CPU_KERNELS=0 turns it off)"
    return None


def _weights(model: ZooForCausalLM) -> tuple[list, list, str]:
    """The op's layer_weights and globals for `model` (its own tensors: in-place updates show)."""

    def data(module: nn.Module | None, name: str = "weight") -> torch.Tensor | None:
        value = getattr(module, name, None) if module is not None else None
        return value.detach() if value is not None else None

    layers, activation = [], "swiglu"
    for block in model.model.layers:
        attention, ffn = block.mixer, block.ffn
        entries = {"mixer_norm": data(block.mixer_norm), "ffn_norm": data(block.ffn_norm)}
        for field, linear in (("q", attention.q_proj), ("k", attention.k_proj),
                              ("v", attention.v_proj), ("o", attention.o_proj)):
            entries[field], entries[f"{field}_bias"] = data(linear), data(linear, "bias")
        if isinstance(ffn, SwiGLU):
            linears = {"gate": ffn.gate_proj, "up": ffn.up_proj, "down": ffn.down_proj}
        elif isinstance(ffn, MLP):
            linears, activation = {"gate": ffn.fc_in, "down": ffn.fc_out}, "gelu"
        else:
            linears = {}
        for field, linear in linears.items():
            entries[field], entries[f"{field}_bias"] = data(linear), data(linear, "bias")
        layers += [entries.get(field) for field in transformer_step.LAYER_FIELDS]
    rotary = model.model.layers[0].mixer.rotary
    globals_ = {
        "embed": data(model.model.embed_tokens), "embed_norm": data(model.model.embed_norm),
        "final_norm": data(model.model.norm), "head": data(model.lm_head),
        "inv_freq": rotary.inv_freq.float().contiguous() if rotary is not None else None,
    }
    return layers, [globals_[field] for field in transformer_step.GLOBAL_FIELDS], activation


def native_decode_step(model: ZooForCausalLM, layout: CacheLayout, greedy: bool) -> NativeStep:
    """The native step for `model` (check `native_support` first):

        out, tensors, ints = step(ids (B, 1), tensors, ints)

    with `tensors, ints` as `ZooCache.flatten` gives them for this layout (per layer k_t, v;
    seen_tokens, then per layer length, position). The caches take the token in place; every
    int advances by one. `out` is the logits (B, V), or the argmax tokens (B,) with greedy."""
    layer_weights, globals_, activation = _weights(model)
    attention = model.model.layers[0].mixer
    config = dict(n_heads=attention.n_heads, n_kv_heads=attention.n_kv_heads,
                  head_dim=attention.head_dim, eps=model.model.norm.eps,
                  activation=activation, greedy=greedy, backend="cpu")

    def step(ids: torch.Tensor, tensors: list[torch.Tensor], ints: list[int]):
        out = transformer_step.transformer_decode_step(
            ids.reshape(-1), layer_weights, globals_, tensors, ints[1::2], ints[2::2], **config)
        return out, tensors, [i + 1 for i in ints]

    return step
