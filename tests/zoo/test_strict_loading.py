"""`ZooForCausalLM.from_pretrained` loads strictly: a folder whose weights are absent, damaged, or
do not match its config.json is an error naming the tensors or the file, never a model with
random weights; `strict=False` is the explicit opt-out for deliberate partial loads."""

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

import zoo
from zoo.model import SavedWeightsError, ZooForCausalLM


def _saved(tmp_path, name="attention-tiny", **overrides):
    torch.manual_seed(0)
    model = ZooForCausalLM(zoo.load_config(name, **overrides))
    model.save_pretrained(tmp_path)
    return model


def _rewrite_weights(folder, change) -> None:
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    change(tensors)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("load", [ZooForCausalLM.from_pretrained,
                                  AutoModelForCausalLM.from_pretrained],
                         ids=["ZooForCausalLM", "AutoModelForCausalLM"])
def test_a_missing_tensor_is_an_error_naming_it(tmp_path, load):
    _saved(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mixer.k_proj.weight"))
    with pytest.raises(SavedWeightsError,
                       match=r"1 missing \(model\.layers\.1\.mixer\.k_proj\.weight\)"):
        load(tmp_path)


def test_an_unexpected_tensor_is_an_error_naming_it(tmp_path):
    _saved(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.mixer.extra": torch.ones(3)}))
    with pytest.raises(SavedWeightsError, match=r"1 unexpected \(model\.layers\.0\.mixer\.extra\)"):
        ZooForCausalLM.from_pretrained(tmp_path)


def test_a_changed_mixer_type_is_an_error_listing_both_sides(tmp_path):
    _saved(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(mixer={"type": "mamba"}))
    with pytest.raises(SavedWeightsError) as error:
        ZooForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    # the first three names of each side, then a count of the rest
    assert "missing (model.layers.0.mixer." in message and "more" in message
    assert "unexpected (model.layers.0.mixer.k_proj.weight" in message
    assert "strict=False" in message


def test_a_mis_shaped_tensor_is_an_error_with_both_shapes(tmp_path):
    _saved(tmp_path)  # attention-tiny: 4 query heads, 2 key-value heads of 16 dimensions
    _edit_config(tmp_path, lambda c: c["mixer"].update(n_kv_heads=4))
    with pytest.raises(SavedWeightsError,
                       match=r"4 mis-shaped \(model\.layers\.0\.mixer\.k_proj\.weight "
                             r"\(file 32x64, model 64x64\)"):
        ZooForCausalLM.from_pretrained(tmp_path)


def test_strict_false_and_ignore_mismatched_sizes_are_the_explicit_opt_outs(tmp_path):
    original = _saved(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.norm.weight"))
    model, info = ZooForCausalLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {"model.norm.weight"}
    kept = "model.layers.0.mixer.q_proj.weight"
    assert torch.equal(model.state_dict()[kept], original.state_dict()[kept])

    _saved(tmp_path)
    _edit_config(tmp_path, lambda c: c["mixer"].update(n_kv_heads=4))
    model = ZooForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert model.model.layers[0].mixer.k_proj.weight.shape == (64, 64)


def test_tied_heads_untied_heads_and_buffers_load_strictly(tmp_path):
    # neither a tied lm_head (absent from the file) nor rotary's non-persistent frequencies
    # count as missing; an untied head is saved and loaded like any tensor
    for tie in (True, False):
        model = _saved(tmp_path / str(tie), tie_embeddings=tie)
        loaded, info = ZooForCausalLM.from_pretrained(tmp_path / str(tie),
                                                      output_loading_info=True)
        assert not any(info.values()), info
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_truncated_weights_file_is_an_error_naming_it(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SavedWeightsError, match=r"model\.safetensors: damaged or truncated"):
        ZooForCausalLM.from_pretrained(tmp_path)


def test_a_folder_without_weights_is_an_error_naming_what_it_holds(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SavedWeightsError, match=r"no weights.*holds config.json"):
        ZooForCausalLM.from_pretrained(tmp_path)


def test_sharded_folders_load_and_a_missing_shard_is_named(tmp_path):
    torch.manual_seed(0)
    original = ZooForCausalLM(zoo.load_config("attention-tiny"))
    original.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    loaded = ZooForCausalLM.from_pretrained(tmp_path)
    for key, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    shards[-1].unlink()
    with pytest.raises(SavedWeightsError, match=f"{shards[-1].name}: missing"):
        ZooForCausalLM.from_pretrained(tmp_path)


def test_saved_weights_errors_are_value_errors():
    # the CLI turns ValueErrors into one named line and exit code 2
    assert issubclass(SavedWeightsError, ValueError)


def test_a_truncated_transformers_source_is_named_by_from_hf(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(tmp_path)
    assert zoo.from_hf(str(tmp_path)).config.n_layers == 1
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(SavedWeightsError, match=r"model\.safetensors: damaged or truncated"):
        zoo.from_hf(str(tmp_path))
