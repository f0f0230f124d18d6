"""`ZooForCausalLM`: pre-norm residual blocks of any registered mixer and FFN, as a Hugging Face
`PreTrainedModel` with `GenerationMixin` (save/load in safetensors, `generate()`).

Read top to bottom: the output type, a block, the backbone, the language model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from zoo.cache import LayerState, ZooCache
from zoo.config import ZooConfig
from zoo.layers import build_ffn, build_mixer, build_norm
from zoo.layers.linear import Linear


@dataclasses.dataclass
class ZooCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: ZooCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None  # summed auxiliary losses of the FFNs (MoE)


class ZooBlock(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)) when the layer has an FFN."""

    def __init__(self, config: ZooConfig, index: int):
        super().__init__()
        mixer_spec, ffn_spec = config.layer_spec(index)
        self.mixer_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.mixer = build_mixer(mixer_spec, config.d_model, index)
        self.ffn_norm, self.ffn = None, None
        if ffn_spec is not None:
            self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.ffn = build_ffn(ffn_spec, config.d_model)

    def forward(self, x: torch.Tensor, state: LayerState | None) -> tuple[torch.Tensor, LayerState]:
        mixer_state, ffn_state = state if state is not None else (None, None)
        h, mixer_state = self.mixer(self.mixer_norm(x), mixer_state)
        x = x + h
        if self.ffn is not None:
            h, ffn_state = self.ffn(self.ffn_norm(x), ffn_state)
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


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    base_model_prefix = "model"
    _no_split_modules = ["ZooBlock"]
    main_input_name = "input_ids"

    def _init_weights(self, module: nn.Module) -> None:
        # Mixers and FFNs initialise their own parameters in their constructors (Mamba's dt and
        # A_log, RWKV's decays...); only embeddings and an untied head get the GPT-style normal
        # here. Non-persistent buffers (rotary frequencies) are recomputed: transformers'
        # from_pretrained materialises them empty.
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ZooForCausalLM) and not self.config.tie_word_embeddings:
            nn.init.normal_(module.lm_head.weight, mean=0.0, std=std)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # zoo brings its own cache (ZooCache) of recurrent states

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, then `align_parameters` (the weights it maps from a
        safetensors file start on 8-byte boundaries)."""
        loaded = super().from_pretrained(*args, **kwargs)
        align_parameters(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded


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
    ) -> tuple[torch.Tensor, ZooCache | None, tuple[torch.Tensor, ...] | None]:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            x, state = block(x, cache.layers[i] if cache is not None else None)
            if cache is not None:
                cache.layers[i] = state
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.seen_tokens += x.shape[1]
        return self.norm(x), cache, tuple(hidden) if hidden is not None else None


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """The zoo language model. input_ids (B, T) -> logits (B, T, vocab_size)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
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

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Out-of-vocabulary ids are an error here, not garbage (or a CUDA assert) later."""
        if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
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
            self.check_input_ids(input_ids)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask has padding: a recurrent state cannot skip masked tokens. "
                "Use zoo.infer.generate for prompts of different lengths (it prefills each row "
                "at its own length)"
            )
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, ZooCache):
            raise TypeError(f"cache must be a ZooCache, got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else (cache is not None or (
            self.config.use_cache and not self.training))
        if use_cache and cache is None:
            cache = self.new_cache()
        hidden, cache, all_hidden = self.model(
            input_ids, inputs_embeds, cache if use_cache else None,
            output_hidden_states=bool(output_hidden_states),
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
