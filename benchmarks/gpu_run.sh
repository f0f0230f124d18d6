#!/usr/bin/env bash
# One device call: install zoo's wheel (carried in gpu_carry/; the machine fetches nothing),
# run the GPU tests, then the op benchmarks on CUDA. Logs and results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install --no-deps --no-index --force-reinstall -q gpu_carry/zoo-*.whl 2>&1 | tail -3
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/device.txt" 2>&1
cd /tmp && cp -r "$OLDPWD/tests" /tmp/zoo_tests && cp "$OLDPWD/pyproject.toml" /tmp/
timeout 420 python3 -m pytest -q -m gpu /tmp/zoo_tests --timeout 120 -p no:cacheprovider -rA > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit $?" >> "$OUT/pytest_gpu.log"
tail -40 "$OUT/pytest_gpu.log"
mkdir -p /tmp/bench
for name in ${BENCHES:-decode-attention-op linear-attention-op wkv4-op fft-conv}; do
  timeout 150 python3 -m zoo.app.cli bench "$name" --device cuda --budget-s 90 --out /tmp/bench > "/tmp/bench/$name.log" 2>&1
  echo "$name exit $?"; tail -4 "/tmp/bench/$name.log"
done
tar czf "$OUT/bench.tgz" -C /tmp bench
