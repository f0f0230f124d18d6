"""ZooForCausalLM as a Hugging Face model: every tiny shipped config builds, round-trips through
save_pretrained / AutoModelForCausalLM exactly, and generates through its recurrent cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from zoo.model import CACHE_LINE, align_parameters
from zoo.testing import assert_close

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]


def _model(name):
    torch.manual_seed(0)
    return zoo.ZooForCausalLM(zoo.load_config(name)).eval()


def _ids(model, B=2, T=11):
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=generator)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_save_and_auto_load_round_trip_exactly(name, tmp_path):
    model = _model(name)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is zoo.ZooForCausalLM
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for key in saved:
        assert torch.equal(saved[key], restored[key]), f"{key} changed in the round trip"
    # The logits too: the loaded weights are moved onto cache lines (align_parameters), where
    # the CPU BLAS, which picks kernels by alignment, runs the same ones as for the original.
    ids = _ids(model)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


@torch.no_grad()
def test_loaded_weights_start_on_cache_lines(tmp_path):
    model = _model("attention-tiny")
    model.save_pretrained(tmp_path)
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path),
                   zoo.ZooForCausalLM.from_pretrained(tmp_path, output_loading_info=True)[0]):
        assert all(p.data_ptr() % CACHE_LINE == 0 for p in loaded.parameters())
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def _off_alignment(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of tensor starting 4 bytes past a cache line."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    return storage[1:].view_as(tensor).copy_(tensor)


@torch.no_grad()
def test_align_parameters_moves_only_misaligned_tensors_and_keeps_ties():
    model = _model("attention-tiny")
    ids = _ids(model)
    expected = model(ids).logits
    q_weight = model.model.layers[0].mixer.q_proj.weight
    embedding = model.model.embed_tokens.weight  # tied: also lm_head.weight
    q_weight.data = _off_alignment(q_weight)
    embedding.data = _off_alignment(embedding)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert q_weight.data_ptr() % CACHE_LINE != 0

    assert align_parameters(model) == 2
    moved = sorted(name for name, p in model.named_parameters() if p.data_ptr() != before[name])
    assert moved == ["model.embed_tokens.weight", "model.layers.0.mixer.q_proj.weight"]
    assert q_weight.data_ptr() % CACHE_LINE == 0 and embedding.data_ptr() % CACHE_LINE == 0
    assert model.lm_head.weight is embedding
    assert torch.equal(model(ids).logits, expected)
    assert align_parameters(model) == 0


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_generate_equals_a_token_by_token_greedy_loop(name):
    model = _model(name)
    prompt = _ids(model, T=6)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)

    out = model(prompt, use_cache=True)
    tokens, cache = [prompt], out.cache
    next_token = out.logits[:, -1:].argmax(-1)
    for _ in range(8):
        tokens.append(next_token)
        out = model(next_token, cache=cache, use_cache=True)
        cache, next_token = out.cache, out.logits[:, -1:].argmax(-1)
    assert torch.equal(generated, torch.cat(tokens, dim=1))


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(name):
    model = _model(name)
    ids = _ids(model, T=13)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(5, 13):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    assert cache.seen_tokens == 13
    stepped = torch.cat(pieces, dim=1)
    assert (full - stepped).abs().max() <= 1e-4 * full.abs().max()


@pytest.mark.parametrize("name", TINY)
def test_loss_is_next_token_cross_entropy_and_backpropagates(name):
    model = _model(name).train()
    ids = _ids(model)
    out = model(ids, labels=ids)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    if out.aux_loss is not None:
        expected = expected + out.aux_loss
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tied_embeddings_share_storage():
    model = _model("attention-tiny")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_out_of_vocabulary_ids_are_a_clear_error():
    model = _model("attention-tiny")
    with pytest.raises(ValueError, match=r"token id 256, outside the vocabulary \[0, 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_misshaped_masks_and_foreign_caches_are_refused():
    model = _model("attention-tiny")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(TypeError, match="ZooCache"):
        model(ids, cache=object())
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2], [3, 4]]), use_cache=True).cache
        with pytest.raises(ValueError, match="batch size"):
            model(ids, cache=cache)


def test_forward_reads_no_value_of_inputs_off_the_cpu():
    # Meta tensors stand in for an accelerator's: reading any value of one raises, where on a
    # GPU it would be a host sync on every forward
    with torch.device("meta"):
        model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).eval()
        ids = torch.zeros(2, 8, dtype=torch.long)
        out = model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert out.logits.shape == (2, 8, model.config.vocab_size)


def test_compiled_forward_has_no_graph_break_from_the_input_checks():
    model = _model("attention-tiny")
    ids = _ids(model)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(
            ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


@torch.no_grad()
def test_padded_forward_compiles_whole_and_equals_eager():
    # inside a graph the mask is passed as given (checking it for a zero would break the graph)
    model = _model("attention-tiny")
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    ids = torch.tensor([[5, 1, 2, 3], [4, 1, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    try:
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
    finally:
        torch._dynamo.reset()
    want = model(ids, attention_mask=mask, use_cache=False).logits
    assert_close("compiled padded logits", want, got, 1e-5)
    alone = model(ids[:1, 1:], use_cache=False).logits[0]
    assert_close("left-padded row vs alone", alone, got[0, 1:], 1e-5)


def test_only_length_limited_mixers_report_a_sequence_limit():
    assert _model("attention-tiny").sequence_limit() is None
    hyena = _model("hyena-tiny")
    assert hyena.sequence_limit() == (hyena.config.mixer["max_len"], "layer 0 (Hyena) max_len")
