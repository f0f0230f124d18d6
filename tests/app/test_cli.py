import json

import pytest

from zoo.app.cli import main


def test_info_prints_parameters_layers_and_state_bytes(capsys):
    assert main(["info", "attention-tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "attention + swiglu" in out
    # attention-tiny: 2 layers x 2 KV heads x 16 dims x (k, v) x 4 bytes = 512 B per token
    assert "1k tokens: 512.0 KiB" in out and "64k tokens: 32.0 MiB" in out


def test_info_on_a_bad_name_is_an_error_listing_shipped_configs(capsys):
    assert main(["info", "nope"]) == 2
    assert "shipped:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["attention-train-step", "attention-decode"])
def test_bench_quick_writes_json_with_the_device(name, tmp_path, capsys):
    assert main(["bench", name, "--quick", "--repeats", "1", "--out", str(tmp_path),
                 "--no-plot"]) == 0
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["environment"]["device"] and record["environment"]["torch"]
    assert len(record["rows"]) == 2 and all(v is not None for v in record["rows"][0].values())


def test_bench_list_names_the_entries(capsys):
    assert main(["bench", "--list"]) == 0
    assert "attention-decode" in capsys.readouterr().out
