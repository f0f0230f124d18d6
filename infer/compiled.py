"""The fast decode steps `generate(compile=...)` runs: torch.compile's graph of the model step,
or zoo.infer.native's C++ step where it applies."""

from __future__ import annotations

from collections.abc import Callable

import torch

from zoo.cache import CacheLayout
from zoo.compression import prepare_kernels
from zoo.model import ZooForCausalLM

from . import native
from .step import decode_step


class _CompiledSteps(dict):
    """A model's compiled steps, kept in its __dict__. They close over that model object, so a
    copy of the model (deepcopy, pickle) starts without them rather than running the
    original's weights."""

    def __deepcopy__(self, memo) -> _CompiledSteps:
        return _CompiledSteps()

    def __reduce__(self):
        return _CompiledSteps, ()


CompiledStep = Callable[
    [torch.Tensor, list[torch.Tensor], list[int]],
    tuple[torch.Tensor, list[torch.Tensor], list[int]],
]


def _skip_module_and_global_guards(entries) -> list[bool]:
    """A guard_filter_fn: keep every guard but those on nn.Modules and on globals."""
    off_modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    off_globals = torch.compiler.skip_guard_on_globals_unsafe(entries)
    return [keep and also for keep, also in zip(off_modules, off_globals)]


def compiled_decode_step(
    model: ZooForCausalLM, layout: CacheLayout, greedy: bool = False
) -> CompiledStep:
    """`decode_step` under torch.compile, on a cache taken apart by `ZooCache.flatten`:

        logits, tensors, ints = step(ids, tensors, ints)

    With greedy=True the step returns the argmax tokens (B,) in place of the logits, so greedy
    decoding runs no op outside the graph. The step takes and returns the cache's tensors and
    integers, not its objects, so dynamo rebuilds no state objects after each step. One compiled
    step per model, dtype, device and layout, kept on the model.

    On the CPU a small model's step is all fixed cost, one call per op: inductor fuses the small
    ops, and its decompose-mm pass turns one-row products into reductions it fuses too. Shapes
    start static; the first step whose lengths differ (a KV cache, the token count) recompiles
    once with them dynamic. Where attention's PyTorch path stands in for the C++ decode kernel
    (float64, no compiler), one more compile comes when a KV cache passes 4096 tokens: inductor
    sums longer float32 reductions in cascaded blocks and guards the length on that side.
    Measured effects of each choice: benchmarks/results/README.md.
    """
    weight = next(model.parameters())
    # a .to() keeps the parameter objects (whose guards are skipped, below): compile anew
    key = (weight.dtype, weight.device, layout, greedy)
    steps = model.__dict__.setdefault("_zoo_compiled_decode_steps", _CompiledSteps())
    # quantised layers repack their codes for the CPU kernels now, outside the graph (a no-op
    # when done already), so that no step repacks them
    prepare_kernels(model, weight.dtype)
    if key not in steps:
        on_cuda = weight.device.type == "cuda"

        def step(ids, tensors, ints):
            cache = layout.unflatten(tensors, ints)
            logits = decode_step(model, ids, cache)
            new_layout, tensors, ints = cache.flatten()
            if new_layout != layout:  # checked while tracing; costs nothing per step
                raise RuntimeError(f"a decode step changed the cache's layout: {new_layout}")
            if greedy:  # as choose_tokens picks greedily
                return logits.float().argmax(dim=-1), tensors, ints
            return logits, tensors, ints

        # dynamo keeps compiled graphs per code object: a code object of this model's own keeps
        # another model (whose module guards are skipped too) from running this one's graphs
        step.__code__ = step.__code__.replace(co_name=f"decode_step_{len(steps)}_{id(model):x}")
        # Guards on the model's modules and on globals are skipped: checking hundreds of
        # parameters every step costs more than a small step's work. Weights may change in
        # place, and a new dtype or device compiles anew (the key above); swapping modules needs
        # a new model object, and monkeypatching a function the layers call after the step
        # compiled goes unnoticed. Inductor's size asserts re-check what the input guards
        # checked already, so they are off too.
        steps[key] = torch.compile(step, dynamic=None, options=_compile_options(on_cuda))
    return steps[key]


COMPILE_MODES = (False, True, "inductor", "native")


def fast_decode_step(model: ZooForCausalLM, layout: CacheLayout, greedy: bool, batch_size: int,
                     mode: bool | str = True) -> CompiledStep:
    """The step `generate(compile=mode)` runs. "native": zoo.infer.native's C++ step, one call
    per token (CPU; stacks of attention with SwiGLU or GELU FFNs and RMSNorm; at most 16 rows;
    float weights, or int8 / int4 quantised linears), an error where it does not apply;
    "inductor": `compiled_decode_step`; True: native where it applies, inductor otherwise."""
    if mode in (True, "native"):
        support = native.native_support(model, layout, batch_size)
        if support:
            return native.native_decode_step(model, layout, greedy)
        if mode == "native":
            raise ValueError(f"compile='native' does not apply to this model: {support.reason}")
    return compiled_decode_step(model, layout, greedy)


def _compile_options(on_cuda: bool) -> dict:
    """torch.compile's options for the decode step. No CUDA graphs on CUDA: the step's new
    states are its outputs and the next step's inputs, which a graph replay overwrites
    (cudagraph trees refuse every bounded mixer), and attention's in-place KV writes make
    inductor skip the capture anyway."""
    options = {"guard_filter_fn": _skip_module_and_global_guards, "size_asserts": False}
    if not on_cuda:
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    return options
