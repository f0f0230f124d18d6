"""`ZooForCausalLM`: pre-norm residual blocks of any registered mixer and FFN, as a Hugging Face
`PreTrainedModel` with `GenerationMixin` (save/load in safetensors, `generate()`).

Read top to bottom: the output type, a block, the backbone, the language model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from zoo.cache import LayerState, ZooCache
from zoo.compression import apply_quantized_layout
from zoo.config import ZooConfig
from zoo.layers import build_ffn, build_mixer, build_norm
from zoo.layers.attention import apply_kv_cache
from zoo.layers.linear import Linear


@dataclasses.dataclass
class ZooCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: ZooCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None  # summed auxiliary losses of the FFNs (MoE)


class ZooBlock(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)) when the layer has an FFN.

    Under `model.gradient_checkpointing_enable()` (transformers sets `gradient_checkpointing`
    and `_gradient_checkpointing_func` on every module that has the flag) a training forward
    without states keeps only the block's input and recomputes the rest in the backward pass.
    """

    gradient_checkpointing = False

    def __init__(self, config: ZooConfig, index: int):
        super().__init__()
        mixer_spec, ffn_spec = config.layer_spec(index)
        self.mixer_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.mixer = build_mixer(mixer_spec, config.d_model, index)
        apply_kv_cache(self.mixer, config.kv_cache)  # what attention's KV cache holds
        # a mixer that reads what earlier layers computed in the same forward (RWKV-7's value
        # residual) declares it and gets the forward's context; the others keep (x, state)
        self.mixer_takes_context = self.mixer.takes_forward_context
        self.ffn_norm, self.ffn = None, None
        if ffn_spec is not None:
            self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.ffn = build_ffn(ffn_spec, config.d_model)

    def forward(
        self, x: torch.Tensor, state: LayerState | None, *, keep_state: bool = True,
        context: dict[str, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LayerState | None]:
        """(x after the block, the layer's state after the last token); with `keep_state=False`
        the caller discards the state, which lets a checkpointed block return None for it.
        `context` is the forward's dict of tensors that layers leave for later layers
        (ZooModel.forward); only a mixer that takes it reads or adds to it. `padding_mask`
        (B, T) bool, True at real tokens, or None: the padding contract of layers/base.py."""
        if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and state is None and not keep_state):
            # Only stateless calls: the recompute would write an in-place state (a KV cache)
            # twice.
            return self._checkpointed(
                x, context if self.mixer_takes_context else None, padding_mask), None
        return self._forward(x, state, context, padding_mask)

    def _checkpointed(self, x: torch.Tensor, context: dict[str, torch.Tensor] | None,
                      padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block under `_gradient_checkpointing_func`. What it reads from the context goes
        in, and what it adds comes out, as explicit tensors, as does the FFN's auxiliary loss:
        reentrant checkpointing tracks the gradient of no other tensor."""
        names = tuple(context) if context is not None else ()
        added: list[str] = []

        def run(x: torch.Tensor, *values: torch.Tensor) -> tuple:
            local = dict(zip(names, values)) if context is not None else None
            x, _ = self._forward(x, None, local, padding_mask)
            added[:] = [name for name in local or () if name not in names]
            return (x, getattr(self.ffn, "aux_loss", None), *(local[name] for name in added))

        x, aux_loss, *new_values = self._gradient_checkpointing_func(
            run, x, *(context[name] for name in names))
        if context is not None:
            context.update(zip(added, new_values))
        if aux_loss is not None:
            self.ffn.aux_loss = aux_loss
        return x

    def _forward(
        self, x: torch.Tensor, state: LayerState | None,
        context: dict[str, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LayerState]:
        mixer_state, ffn_state = state if state is not None else (None, None)
        # the keyword only when there is padding: the unpadded call stays what it always was
        padded = {} if padding_mask is None else {"padding_mask": padding_mask}
        if self.mixer_takes_context:
            h, mixer_state = self.mixer(self.mixer_norm(x), mixer_state, context=context,
                                        **padded)
        else:
            h, mixer_state = self.mixer(self.mixer_norm(x), mixer_state, **padded)
        x = x + h
        if self.ffn is not None:
            h, ffn_state = self.ffn(self.ffn_norm(x), ffn_state, **padded)
            x = x + h
        return x, (mixer_state, ffn_state)


# Bytes per x86 cache line, and the alignment of every tensor torch's CPU allocator makes.
CACHE_LINE = 64


@torch.no_grad()
def align_parameters(module: nn.Module, alignment: int = CACHE_LINE) -> int:
    """Give every CPU parameter and buffer whose data starts off an `alignment`-byte boundary
    fresh memory of its own (same values, same Parameter objects, tied weights still tied);
    returns how many tensors moved.

    Why: decoding reads every weight once a token with 64-byte vector loads, and a load that
    straddles two cache lines costs more. Weights loaded from a safetensors file are views of
    the mapped file at offsets set by its header (8-byte aligned), and transformers' GGUF
    reader builds them from NumPy arrays (16-byte aligned), so most of them start off a cache
    line (what aligning gained on SmolLM2's decode step: README, "Measured: decoding";
    benchmarks/results/cpu/decode-smollm2.md has the step's timings with aligned weights).
    """
    # tied weights are one Parameter, met once; a buffer that is the same view of the same
    # data as another tensor gets the same copy
    moved: dict[tuple, torch.Tensor] = {}
    count = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        if tensor.data_ptr() % alignment == 0:
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
        if key not in moved:
            moved[key] = tensor.detach().clone(memory_format=torch.contiguous_format)
            count += 1
        tensor.data = moved[key]
    return count


class SavedWeightsError(ValueError):
    """A saved model folder whose weights are absent, damaged, or do not match its config.json."""


# save_pretrained's file names: one safetensors file, or shards listed by an index
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def check_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a save_pretrained folder, each checked whole without reading its
    tensors (its header parses and the file is as long as the header says), or a
    SavedWeightsError naming the folder or the file and what is wrong."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SavedWeightsError(
                f"{index}: not a safetensors index with a weight_map ({error})") from None
        files = [folder / shard for shard in shards]
    elif (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    else:
        raise SavedWeightsError(
            f"{folder}: no weights: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} is there "
            f"(zoo loads weights only from safetensors; the folder holds {_contents(folder)})"
        )
    for file in files:
        if not file.is_file():
            raise SavedWeightsError(f"{file}: missing, and {index.name} lists it as a shard")
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError (an Exception)
            raise SavedWeightsError(
                f"{file}: damaged or truncated safetensors file ({error})") from None
    return files


def check_model_folder(folder: str | os.PathLike) -> list[Path]:
    """A save_pretrained folder's weight files (`check_weight_files`), after checking it has a
    config.json: a FileNotFoundError naming what the folder holds instead."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: no config.json, so not a saved model (the folder holds "
            f"{_contents(folder)}); give a save_pretrained folder, a YAML file or a shipped "
            "config name"
        )
    return check_weight_files(folder)


def _contents(folder: Path, shown: int = 5) -> str:
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(held[:shown]) + (" ..." if len(held) > shown else "") if held else "nothing"


def _few(names: set | list, shown: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def loading_mismatch(info: dict, source: str, allow_mismatched: bool = False) -> str | None:
    """One line naming the missing, unexpected and mis-shaped tensors of transformers' loading
    info (`output_loading_info=True`), or None when the folder and the model agree."""
    missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
    # transformers lists a mis-shaped tensor as (name, shape in the file, shape in the model)
    mismatched = [] if allow_mismatched else [
        f"{entry[0]} (file {_shape(entry[1])}, model {_shape(entry[2])})"
        if isinstance(entry, tuple) and len(entry) == 3 else str(entry)
        for entry in info.get("mismatched_keys", ())
    ]
    errors = [str(e) for e in info.get("error_msgs", ()) if e]
    if not (missing or unexpected or mismatched or errors):
        return None
    parts = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if keys]
    parts += [f"errors: {_few(errors)}"] if errors else []
    return (f"{source}: the saved weights do not match its config.json: " + "; ".join(parts)
            + ". Pass strict=False to load such a folder anyway (missing tensors are then "
            "randomly initialised)")


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    base_model_prefix = "model"
    _no_split_modules = ["ZooBlock"]
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # every ZooBlock checkpoints itself
    # from_pretrained(dtype=bf16) builds the model in that dtype without calling .to(), which is
    # where Hyena's filter network keeps float32 (layers/base.py at_least_float32)
    _keep_in_fp32_modules_strict = ["filter_ffn"]

    def _init_weights(self, module: nn.Module) -> None:
        # Mixers and FFNs initialise their own parameters in their constructors (Mamba's dt and
        # A_log, RWKV's decays...); only embeddings and an untied head get the GPT-style normal
        # here. Non-persistent buffers (rotary frequencies) are recomputed: transformers'
        # from_pretrained materialises them empty.
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif (isinstance(module, ZooForCausalLM) and not self.config.tie_word_embeddings
              and isinstance(module.lm_head, nn.Linear)):  # a quantised head holds codes
            nn.init.normal_(module.lm_head.weight, mean=0.0, std=std)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # zoo brings its own cache (ZooCache) of recurrent states

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True,
                        **kwargs):
        """transformers' from_pretrained, strictly, then `align_parameters` (the weights it maps
        from a safetensors file start on 8-byte boundaries).

        strict (the default): a folder without weights or with a damaged safetensors file, and
        a tensor the model has but the folder lacks, one the folder has but the model lacks, or
        one whose shape differs, is a SavedWeightsError naming them, where transformers would
        initialise the model's tensors randomly and only log it. `strict=False` is the opt-out
        for deliberate partial loads; `ignore_mismatched_sizes=True` keeps transformers'
        meaning (mis-shaped tensors re-initialised) and lets only those through.
        """
        source = pretrained_model_name_or_path
        folder = Path(os.fspath(source)) / (kwargs.get("subfolder") or "") if isinstance(
            source, (str, os.PathLike)) else None
        if strict and folder is not None and folder.is_dir() and not any(
                kwargs.get(k) for k in ("gguf_file", "state_dict", "variant")):
            check_weight_files(folder)  # before any work: absent or truncated files
        allow_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
        want_info = bool(kwargs.pop("output_loading_info", False))
        loaded = super().from_pretrained(
            source, *args, output_loading_info=True,
            # strict lists mis-shaped tensors with the rest; transformers would raise a
            # RuntimeError that points at its log instead
            ignore_mismatched_sizes=strict or allow_mismatched, **kwargs,
        )
        model, info = loaded
        if strict:
            problem = loading_mismatch(info, str(source), allow_mismatched)
            if problem is not None:
                raise SavedWeightsError(problem)
        align_parameters(model)
        return (model, info) if want_info else model


class ZooModel(ZooPreTrainedModel):
    """Embedding -> blocks -> final norm. input_ids (B, T) -> hidden states (B, T, d_model)."""

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_norm = (
            build_norm(config.norm, config.d_model, config.norm_eps) if config.embed_norm else None
        )
        self.layers = nn.ModuleList(ZooBlock(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ZooCache | None = None,
        output_hidden_states: bool = False,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ZooCache | None, tuple[torch.Tensor, ...] | None]:
        """padding_mask: (B, T) bool, True at real tokens, or None (no padding), given to every
        mixer and FFN (the padding contract of layers/base.py)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        hidden = [x] if output_hidden_states else None
        # what a layer leaves for later layers of this call (RWKV-7's first-layer values): it
        # covers only this call's tokens, so no cache or compiled step carries it across calls
        context: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.layers):
            x, state = block(x, cache.layers[i] if cache is not None else None,
                             keep_state=cache is not None, context=context,
                             padding_mask=padding_mask)
            if cache is not None:
                cache.layers[i] = state
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.seen_tokens += x.shape[1]
        return self.norm(x), cache, tuple(hidden) if hidden is not None else None


def _reading_back_is_free(tensor: torch.Tensor) -> bool:
    """Whether reading a value of `tensor` on the host costs nothing extra: a CPU tensor in
    eager mode. On an accelerator it is a host sync every step, inside torch.compile a graph
    break."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The mixers' padding_mask for this call's `length` tokens: attention_mask's last columns
    as bool (transformers' generate passes the mask of past and new tokens), or None when there
    is no padding. Where checking for a zero would cost a host sync or a graph break (off the
    CPU, inside torch.compile) any given mask is passed: the padded path is exact either way."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
        raise ValueError(
            f"attention_mask must be (batch, past + {length} tokens), got "
            f"{tuple(attention_mask.shape)}")
    if _reading_back_is_free(attention_mask) and bool(attention_mask.all()):
        return None
    return attention_mask[:, -length:].bool()


def _check_ids_dtype(input_ids: torch.Tensor) -> None:
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """The zoo language model. input_ids (B, T) -> logits (B, T, vocab_size)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.quantization is not None:
            # a quantised folder (zoo.compression): its layers exist before their tensors load
            apply_quantized_layout(self, config.quantization)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> ZooCache:
        return ZooCache(self.config.n_layers)

    def sequence_limit(self) -> tuple[int, str] | None:
        """(the longest sequence, prompt plus generated tokens, every layer takes; the layer
        that sets it), or None when no layer limits the length. A mixer with a limit declares
        it as `max_len` (Hyena: its implicit filters are generated for lags below it)."""
        limits = [
            (block.mixer.max_len, f"layer {i} ({type(block.mixer).__name__}) max_len")
            for i, block in enumerate(self.model.layers)
            if isinstance(getattr(block.mixer, "max_len", None), int)
        ]
        return min(limits, key=lambda limit: limit[0]) if limits else None

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Out-of-vocabulary ids are an error here, not garbage (or a CUDA assert) later.

        Reads two values back to the host: forward() calls it only where that is free."""
        _check_ids_dtype(input_ids)
        if input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = high if high >= self.config.vocab_size else low
            raise ValueError(
                f"input_ids contains token id {bad}, outside the vocabulary "
                f"[0, {self.config.vocab_size}) (config.vocab_size={self.config.vocab_size})"
            )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ZooCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: ZooCache | None = None,
        **kwargs,
    ) -> ZooCausalLMOutput:
        """Logits for every position (or the last `logits_to_keep`), the loss when labels are
        given (next-token cross-entropy, -100 ignored, plus FFN auxiliary losses), and the cache
        after the last token when `use_cache`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            _check_ids_dtype(input_ids)
            if _reading_back_is_free(input_ids):
                self.check_input_ids(input_ids)
            # elsewhere the embedding's own index check (a device assert, inductor's bounds
            # check) stops them; zoo.infer.generate checks its prompts once per call
        padding_mask = _padding_mask(attention_mask, (input_ids if input_ids is not None
                                                      else inputs_embeds).shape[1])
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, ZooCache):
            raise TypeError(f"cache must be a ZooCache, got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else (cache is not None or (
            self.config.use_cache and not self.training))
        if use_cache and cache is None:
            cache = self.new_cache()
        hidden, cache, all_hidden = self.model(
            input_ids, inputs_embeds, cache if use_cache else None,
            output_hidden_states=bool(output_hidden_states), padding_mask=padding_mask,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        aux_losses = [
            block.ffn.aux_loss for block in self.model.layers
            if block.ffn is not None and getattr(block.ffn, "aux_loss", None) is not None
        ]
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
            if aux_loss is not None:
                loss = loss + aux_loss
        return ZooCausalLMOutput(
            loss=loss, logits=logits, cache=cache if use_cache else None,
            hidden_states=all_hidden, aux_loss=aux_loss,
        )
