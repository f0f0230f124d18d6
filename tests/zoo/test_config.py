import pytest

import zoo
from zoo import ConfigError, ZooConfig, load_config, shipped_configs


def test_every_shipped_config_loads_and_validates():
    names = shipped_configs()
    assert "attention-tiny" in names and "attention-small" in names
    for name in names:
        config = load_config(name)
        assert config.n_layers == len(config.describe_layers())


def test_attention_small_is_about_20m_parameters():
    import torch

    with torch.device("meta"):
        model = zoo.ZooForCausalLM(load_config("attention-small"))
    n = sum(p.numel() for p in model.parameters())
    assert 15e6 < n < 25e6


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"mixer": {"type": "nope"}}, r"mixer.type='nope' is not registered; registered mixers"),
        ({"mixer": {"type": "attention", "n_heads": 5}}, "not divisible by n_heads=5"),
        ({"mixer": {"type": "attention", "n_heads": 4, "n_kv_heads": 3}},
         "n_heads=4 is not divisible by n_kv_heads=3"),
        ({"mixer": {"type": "attention", "heads": 4}}, "has no option 'heads'"),
        ({"ffn": {"type": "swiglu", "hidden": 3}}, "ffn 'swiglu' has no option 'hidden'"),
        ({"layers": [{"at": [5], "mixer": {"type": "attention"}}]}, r"layers\[0\].at has layer 5"),
        ({"layers": [{"at": [1], "mixr": {}}]}, "unknown key 'mixr'"),
        ({"norm": "batch"}, "norm='batch' is not one of"),
        ({"d_model": 0}, "d_model=0 must be a positive integer"),
    ],
)
def test_bad_fields_are_named_in_the_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        ZooConfig(**fields)


def test_unknown_yaml_field_and_unknown_name(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 256\nd_modle: 64\n")
    with pytest.raises(ConfigError, match="unknown config field 'd_modle'"):
        load_config(path)
    with pytest.raises(ConfigError, match="shipped:"):
        load_config("no-such-config")


def test_per_layer_overrides_make_a_hybrid():
    config = ZooConfig(
        n_layers=3,
        mixer={"type": "attention", "n_heads": 2},
        layers=[
            {"at": [1], "mixer": {"type": "attention", "n_heads": 4, "window": 8}, "ffn": None}
        ],
    )
    assert config.layer_spec(1) == ({"type": "attention", "n_heads": 4, "window": 8}, None)
    assert config.layer_spec(2)[0] == {"type": "attention", "n_heads": 2}
    model = zoo.ZooForCausalLM(config)
    assert model.model.layers[1].ffn is None and model.model.layers[1].mixer.window == 8


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = load_config("attention-tiny", n_layers=3)
    config.save_pretrained(tmp_path)
    again = ZooConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
