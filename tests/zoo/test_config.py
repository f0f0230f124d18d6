import math

import pytest

import zoo
from zoo import ConfigError, ZooConfig, load_config, shipped_configs
from zoo.layers import FFNS, MIXERS, options_of
from zoo.layers.registry import option_rules


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
        ({"mixer": {"type": "attention", "n_heads": -4}},
         r"^config.mixer.n_heads=-4 must be an integer >= 1 or null \(mixer 'attention'\)$"),
        ({"mixer": {"type": "attention", "n_heads": 0}}, "config.mixer.n_heads=0 must be an"),
        ({"mixer": {"type": "attention", "n_heads": True}},
         "config.mixer.n_heads=True must be an"),
        ({"mixer": {"type": "attention", "n_heads": 4.0}}, "config.mixer.n_heads=4.0 must be"),
        ({"mixer": {"type": "attention", "rope_theta": -1}},
         r"config.mixer.rope_theta=-1 must be a finite number > 0 or null"),
        ({"mixer": {"type": "attention", "rope_theta": math.inf}}, "rope_theta=inf must be"),
        ({"mixer": {"type": "mamba", "d_state": 0}, "ffn": None},
         r"config.mixer.d_state=0 must be an integer >= 1 \(mixer 'mamba'\)"),
        ({"mixer": {"type": "mamba", "dt_min": math.nan}, "ffn": None}, "dt_min=nan must be"),
        ({"mixer": {"type": "linear_attention", "feature_map": "cosine"}},
         "config.mixer.feature_map='cosine' is not one of"),
        ({"mixer": {"type": "mamba2", "A_init_range": [16, 1]}, "ffn": None},
         r"A_init_range=\[16, 1\] must be a pair \[low, high\] of numbers > 0 with low <= high"),
        ({"ffn": {"type": "moe", "jitter_noise": 1.0}}, r"config.ffn.jitter_noise=1.0 must be"),
        ({"ffn": {"type": "swiglu", "hidden_size": 0}}, "config.ffn.hidden_size=0 must be"),
        ({"mixer": 3}, "config.mixer=3 must be a type name or a mapping"),
        ({"mixer": {}}, "config.mixer={} must be a mixer type name or a mapping"),
        ({"n_layers": 3, "layers": [{"at": [0], "ffn": None},
                                    {"at": [2], "mixer": {"type": "mamba", "d_state": 0}}]},
         r"^layers\[1\].mixer.d_state=0 must be an integer >= 1"),
        ({"layers": [{"at": [True], "ffn": None}]}, r"layers\[0\].at=\[True\] must be"),
        ({"layers": [{"at": [], "ffn": None}]}, r"layers\[0\].at=\[\] must be a non-empty"),
        ({"norm_eps": True}, "norm_eps=True must be a finite number > 0"),
        ({"norm_eps": "1e-5"}, "norm_eps='1e-5' must be a finite number > 0"),
        ({"initializer_range": math.nan}, "initializer_range=nan must be"),
        ({"embed_norm": "yes"}, "embed_norm='yes' must be true or false"),
        ({"tie_embeddings": "false"}, "tie_embeddings='false' must be true or false"),
        ({"eos_token_id": 256}, r"eos_token_id=256 must be null or a token id in \[0, "),
        ({"mixer": {"type": "attention", "n_heads": 3}},
         r"config.mixer \(layer 0\): attention: d_model=64 is not divisible by n_heads=3"),
    ],
)
def test_bad_fields_are_named_in_the_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        ZooConfig(**fields)


def test_options_that_may_be_null_or_zero_by_design_stay_allowed():
    config = ZooConfig(mixer={"type": "attention", "n_kv_heads": None, "rope_theta": None,
                              "window": None},
                       ffn={"type": "moe", "jitter_noise": 0.0, "n_shared_experts": 0,
                            "capacity_factor": None})
    assert config.mixer["rope_theta"] is None and config.ffn["jitter_noise"] == 0.0
    assert ZooConfig(mixer={"type": "hyena", "filter_depth": 0}).mixer["filter_depth"] == 0


def test_every_option_of_every_mixer_and_ffn_has_a_rule_its_default_obeys():
    for registry in (MIXERS, FFNS):
        for name, cls in registry.items():
            rules = option_rules(cls)  # a TypeError names an option without a declared range
            assert set(rules) == set(options_of(cls)), name
            for option, default in options_of(cls).items():
                assert rules[option].admits(default), f"{name}.{option}={default!r}"
            for variant in getattr(cls, "test_variants", []):
                for option, value in variant.items():
                    assert rules[option].admits(value), f"{name} test variant {option}={value!r}"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_yaml_is_an_error_not_the_default_model(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml: the config is empty"):
        load_config(path)


def test_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("vocab_size: 256\nmixer: {type: attention\nd_model: 64\n")
    with pytest.raises(ConfigError, match=r"broken.yaml, line 3, column 8: not valid YAML"):
        load_config(path)


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("vocab_size: 256\nmixer: {type: attention, n_heads: 2, n_heads: 4}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml, line 2.*key 'n_heads' is given twice"):
        load_config(path)


def test_numbers_in_exponent_form_are_floats_in_model_yaml(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("vocab_size: 256\nnorm_eps: 1e-5\nmixer: {type: retnet, norm_eps: 1E-6}\n")
    config = load_config(path)
    assert config.norm_eps == 1e-5 and config.mixer["norm_eps"] == 1e-6


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
