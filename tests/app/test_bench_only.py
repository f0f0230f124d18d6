"""`zoo bench NAME --only A,B`: the families an entry runs, checked before any work."""

import pytest

from zoo.app.bench import BenchOptions, load_entries, run_bench
from zoo.app.cli import main


def test_only_runs_the_chosen_family_of_complexity(tmp_path):
    load_entries()
    record = run_bench("complexity", BenchOptions(quick=True, repeats=1, budget_s=30,
                                                  out_dir=tmp_path, only=("rwkv6",)), plot=False)
    assert {row["family"] for row in record["rows"]} == {"rwkv6"}


def test_only_names_an_unknown_family_and_the_allowed_ones(tmp_path):
    load_entries()
    with pytest.raises(ValueError, match=r"--only 'rwkv9' is not a family.*rwkv7"):
        run_bench("mqar", BenchOptions(quick=True, out_dir=tmp_path, only=("rwkv9",)))


def test_only_on_a_bench_without_families_is_refused_on_the_command_line(tmp_path, capsys):
    code = main(["bench", "decode-smollm2", "--only", "x", "--out", str(tmp_path)])
    assert code == 2
    assert "has no families to choose: drop --only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
