"""zoo installs under one import root and leaves transformers' own imports alone."""

import subprocess
import sys


def _python(code: str, cwd) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_no_top_level_packages_named_like_the_folders(tmp_path):
    code = (
        "import importlib.util as u\n"
        "import zoo.kernels, zoo.layers, zoo.train, zoo.infer, zoo.configs\n"
        "print([n for n in ('kernels', 'layers', 'train', 'infer', 'configs') if u.find_spec(n)])"
    )
    assert _python(code, tmp_path).strip() == "[]"


def test_transformers_auto_classes_still_work_with_zoo_installed(tmp_path):
    code = (
        "import zoo, transformers\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "                  num_hidden_layers=1, num_attention_heads=2)\n"
        "m = AutoModelForCausalLM.from_config(cfg)\n"
        "print(type(m).__name__)"
    )
    assert _python(code, tmp_path).strip() == "LlamaForCausalLM"
