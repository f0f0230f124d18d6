"""The native CPU decode step: a ZooForCausalLM whose layers are all softmax attention with
SwiGLU or GELU FFNs and RMSNorm (Llama, SmolLM2, attention-tiny) decodes through
`zoo.kernels.transformer_decode_step`, one C++ call per token, in place of the torch.compile'd
step. Same arguments and results as `compiled_decode_step`'s step (the cache as tensors and
ints); logits equal the model's own up to summation order (float32). Linear layers quantised by
zoo.compression (int8 per channel or in groups, int4 in groups of 32, 64 or 128; the head too)
are read as their codes, dequantised in the kernel's registers.

    support = native_support(model, layout, batch_size)   # truthy where the step applies
    step = native_decode_step(model, layout, greedy)        # else support.reason says why not
    logits_or_tokens, tensors, ints = step(ids, tensors, ints)

The Engine's step (zoo.infer.engine, native="auto") runs the same kernel over its paged KV cache
(zoo.infer.paged): rows at different lengths, each with its block table, in one call:

    support = paged_native_support(model, pool_dtype)
    logits = native_paged_step(model)(ids, kv, block_tables, positions)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from zoo.cache import CacheLayout
from zoo.compression import QuantizedLinear
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
    # the embedding table stays float in a quantised model (a quantised head's `weight` would
    # dequantise the whole matrix)
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}; the native step runs on the CPU"
    if weight.dtype not in transformer_step.KERNEL_DTYPES:
        return f"its weights are {weight.dtype}; the native step takes float32, bfloat16, float16"
    if any(p.is_floating_point() and p.dtype != weight.dtype for p in model.parameters()):
        return "its parameters mix dtypes"
    if batch_size > MAX_NATIVE_BATCH:
        return f"batch {batch_size} > {MAX_NATIVE_BATCH} rows (a matrix product: BLAS's work)"
    if (reason := _unreadable(model.lm_head)) is not None:
        return f"the output head {reason}"
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
        if mixer.kv_cache != "float":
            return (f"layer {i}'s KV cache is {mixer.kv_cache} (kv_cache); the native step "
                    "reads float caches")
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
        for name, linear in _linears(block).items():
            if (reason := _unreadable(linear)) is not None:
                return f"layer {i}'s {name} {reason}"
        if layout.layers[i] is None or layout.layers[i][0] is None or (
            layout.layers[i][0][0] is not AttentionState or layout.layers[i][1] is not None
        ):
            return f"layer {i}'s cache is not a KV cache alone"
        if dict(layout.layers[i][0][1]).get("key_positions") == "tensor":
            return (f"layer {i}'s KV cache holds padding (a padded batch); the native step "
                    "reads caches without it")
    if len(ffn_kinds - {None}) > 1:
        return "its layers mix SwiGLU and MLP FFNs"
    if first.head_dim % 2 or first.head_dim > 512:
        return f"head_dim={first.head_dim}: the native step takes even head dims up to 512"
    if not all(p.is_contiguous() for p in model.parameters()):
        return "a weight is not contiguous"
    if not transformer_step.load():
        return "the C++ kernel did not build (see the warning; ZOO_CPU_KERNELS=0 turns it off)"
    return None


def _linears(block: nn.Module) -> dict[str, nn.Module]:
    """A block's linear layers the step runs, by module name."""
    attention, ffn = block.mixer, block.ffn
    linears = {"q_proj": attention.q_proj, "k_proj": attention.k_proj,
               "v_proj": attention.v_proj, "o_proj": attention.o_proj}
    if isinstance(ffn, SwiGLU):
        linears.update(gate_proj=ffn.gate_proj, up_proj=ffn.up_proj, down_proj=ffn.down_proj)
    elif isinstance(ffn, MLP):
        linears.update(fc_in=ffn.fc_in, fc_out=ffn.fc_out)
    return linears


def _unreadable(linear: nn.Module) -> str | None:
    """Why the step cannot read `linear`'s weights (said of the layer), or None where it can."""
    if isinstance(linear, QuantizedLinear):
        multiple = {"int8": transformer_step.INT8_GROUP_MULTIPLE,
                    "int4": transformer_step.INT4_GROUP_MULTIPLE}.get(linear.weights)
        if multiple is None:
            return f"holds {linear.weights} weights; the native step reads int8 and int4"
        if linear.group_size is not None and linear.group_size % multiple:
            return (f"is {linear.weights} in groups of {linear.group_size}; the native step "
                    f"takes {linear.weights} groups of a multiple of {multiple}"
                    + (" or per output channel" if linear.weights == "int8" else ""))
        return None
    if not isinstance(linear, nn.Linear):
        return (f"is {type(linear).__name__}; the native step reads nn.Linear and "
                "QuantizedLinear")
    # a tensor subclass (torchao's quantised weights) keeps its data in its own layout
    if type(linear.weight) not in (torch.Tensor, nn.Parameter):
        return (f"holds a {type(linear.weight).__name__} weight; the native step reads plain "
                "tensors and QuantizedLinear's codes")
    return None


# the step's fields of a block's linear layers (GELU's fc_in and fc_out sit in gate and down)
_FIELDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
           "up_proj": "up", "down_proj": "down", "fc_in": "gate", "fc_out": "down"}


def _weights(model: ZooForCausalLM) -> tuple[list, list, list | None, list | None, str]:
    """The op's layer_weights, globals, scales and zeros (None where no layer is quantised) for
    `model`: its own tensors, so in-place updates show."""

    def data(module: nn.Module | None, name: str = "weight") -> torch.Tensor | None:
        value = getattr(module, name, None) if module is not None else None
        return value.detach() if value is not None else None

    def linear_entries(linear: nn.Module) -> tuple:
        """(weight, bias, scale, zero): a QuantizedLinear's codes in place of its weight."""
        if isinstance(linear, QuantizedLinear):
            return (data(linear, "qweight"), data(linear, "bias"), data(linear, "scale"),
                    data(linear, "zero"))
        return data(linear), data(linear, "bias"), None, None

    layers, scales, zeros, activation = [], [], [], "swiglu"
    for block in model.model.layers:
        entries = {"mixer_norm": data(block.mixer_norm), "ffn_norm": data(block.ffn_norm)}
        quantized = {}
        for name, linear in _linears(block).items():
            field = _FIELDS[name]
            weight, entries[f"{field}_bias"], *quantized[field] = linear_entries(linear)
            entries[field] = weight
        if isinstance(block.ffn, MLP):
            activation = "gelu"
        for field in transformer_step.LAYER_FIELDS:
            layers.append(entries.get(field))
            scale, zero = quantized.get(field, (None, None))
            scales.append(scale)
            zeros.append(zero)
    rotary = model.model.layers[0].mixer.rotary
    head, _, head_scale, head_zero = linear_entries(model.lm_head)
    globals_ = {
        "embed": data(model.model.embed_tokens), "embed_norm": data(model.model.embed_norm),
        "final_norm": data(model.model.norm), "head": head,
        "inv_freq": rotary.inv_freq.float().contiguous() if rotary is not None else None,
    }
    for field in transformer_step.GLOBAL_FIELDS:
        scales.append(head_scale if field == "head" else None)
        zeros.append(head_zero if field == "head" else None)
    if all(scale is None for scale in scales):
        scales = zeros = None
    return (layers, [globals_[field] for field in transformer_step.GLOBAL_FIELDS], scales,
            zeros, activation)


def native_decode_step(model: ZooForCausalLM, layout: CacheLayout, greedy: bool) -> NativeStep:
    """The native step for `model` (check `native_support` first):

        out, tensors, ints = step(ids (B, 1), tensors, ints)

    with `tensors, ints` as `ZooCache.flatten` gives them for this layout (per layer k_t, v;
    seen_tokens, then per layer length, position). The caches take the token in place; every
    int advances by one. `out` is the logits (B, V), or the argmax tokens (B,) with greedy."""
    layer_weights, globals_, scales, zeros, activation = _weights(model)
    attention = model.model.layers[0].mixer
    config = dict(n_heads=attention.n_heads, n_kv_heads=attention.n_kv_heads,
                  head_dim=attention.head_dim, eps=model.model.norm.eps,
                  activation=activation, greedy=greedy, scales=scales, zeros=zeros,
                  backend="cpu")

    def step(ids: torch.Tensor, tensors: list[torch.Tensor], ints: list[int]):
        out = transformer_step.transformer_decode_step(
            ids.reshape(-1), layer_weights, globals_, tensors, ints[1::2], ints[2::2], **config)
        return out, tensors, [i + 1 for i in ints]

    return step


# The Engine's step: its paged KV cache (zoo.infer.paged) handed to the kernel as it is.
PagedNativeStep = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor],
                           torch.Tensor]


def paged_native_support(model: ZooForCausalLM, pool_dtype: torch.dtype) -> NativeSupport:
    """Whether `model` can decode through `native_paged_step` over a block pool of
    `pool_dtype` (any number of rows: more than MAX_NATIVE_BATCH go in several calls)."""
    weight = model.model.embed_tokens.weight
    cache = model.new_cache()  # the layout of a cache holding one token: its states' kinds
    with torch.inference_mode():
        model.model(torch.zeros(1, 1, dtype=torch.long, device=weight.device), None, cache)
    reason = _why_not_native(model, cache.flatten()[0], MAX_NATIVE_BATCH)
    if reason is None and pool_dtype != weight.dtype:
        reason = (f"its KV blocks are {pool_dtype} and its weights {weight.dtype}; the native "
                  "step keeps both in one dtype")
    return NativeSupport(ok=reason is None, reason=reason or "")


def native_paged_step(model: ZooForCausalLM) -> PagedNativeStep:
    """The native step over a paged KV cache (check `paged_native_support` first):

        logits = step(ids (B,), kv, block_tables (B, W), positions (B,))

    kv: per layer the pool's keys (N, H_kv, D, S) then values (N, H_kv, S, D); row b holds
    positions[b] tokens in the blocks block_tables[b] names, takes the new token's key and value
    at slot positions[b] (which its blocks must cover) and attends over slots 0..positions[b].
    logits (B, V) in the weights' dtype. Rows beyond MAX_NATIVE_BATCH go in further calls."""
    layer_weights, globals_, scales, zeros, activation = _weights(model)
    attention = model.model.layers[0].mixer
    config = dict(n_heads=attention.n_heads, n_kv_heads=attention.n_kv_heads,
                  head_dim=attention.head_dim, eps=model.model.norm.eps,
                  activation=activation, scales=scales, zeros=zeros, backend="cpu")

    def step(ids: torch.Tensor, kv: list[torch.Tensor], block_tables: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        block_tables, positions = block_tables.contiguous(), positions.contiguous()
        outputs = []
        for start in range(0, ids.shape[0], MAX_NATIVE_BATCH):
            rows = slice(start, start + MAX_NATIVE_BATCH)
            outputs.append(transformer_step.transformer_decode_step(
                ids[rows], layer_weights, globals_, kv, positions[rows], positions[rows],
                block_tables=block_tables[rows], **config))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    return step
