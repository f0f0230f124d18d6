"""The linearisation ablation: every variant is a student zoo can build, and the report reads
its rows."""

import pytest
import torch

import zoo
from zoo.app.bench.linearize_ablation import VARIANTS, ablation_report, student_run
from zoo.train.distill import distill_config_from_dict
from zoo.train.linearize import linearize


@pytest.mark.parametrize(("name", "change", "mixer", "distill"), VARIANTS,
                         ids=[v[0] for v in VARIANTS])
def test_every_variant_builds_a_student_of_the_demo_teacher(tmp_path, name, change, mixer,
                                                            distill):
    run = distill_config_from_dict(student_run(tmp_path, name, mixer, distill, quick=True))
    assert run.student.linearize["mixer"] == mixer
    torch.manual_seed(0)
    teacher = zoo.ZooForCausalLM(zoo.load_config("attention-tiny", n_layers=2)).eval()
    student = linearize(teacher, mixer)
    assert student.linearization.replaced == [0, 1]
    ids = torch.randint(0, 256, (1, 20))
    assert torch.isfinite(student(ids).logits).all()


def test_report_gives_the_ratio_and_names_a_skipped_row():
    rows = [{"variant": "window 64", "change": "LoLCATs' layer", "student_ppl": 3.3,
             "teacher_ppl": 3.0, "ppl_ratio": 1.1, "decode_ms_8k": 0.5,
             "state_bytes_8k": 300 * 2**10, "tokens_seen": 1000,
             "teacher_decode_ms_8k": 0.9, "teacher_state_bytes_8k": 8 * 2**20},
            {"variant": "Mamba-2 student", "change": "q -> C", "skipped": "no mapping"}]
    report = ablation_report(rows)
    assert "| window 64 | LoLCATs' layer | 3.300 | x1.100 | 0.500 | 300 KiB | 1,000 | - |" in report
    assert "not run: no mapping" in report and "8.0 MiB KV cache" in report
