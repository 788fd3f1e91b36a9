#!/bin/bash
# GPU checks on a machine with one CUDA GPU (run from the repository root): CUDA smoke of training
# (interrupted + resumed, CRC-verified reads), then bench train at 512x512 for every backbone; JSON to $OUT.
# Needs torch, h5py, pandas; timm from .whl/timm-*.whl when that folder exists (offline machines).
set -o pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
if ls .whl/timm-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/timm-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/scripts:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
echo "=== CUDA smoke: train (interrupted + resumed) with CRC-verified reads"
timeout 90 python3 - <<'PY'
import tempfile, logging
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
from tests.fixtures import train as tf
from deepnoise.errors import InputError
root = Path(tempfile.mkdtemp())
s = tf.make_screen(root, image_size=32, wells_per_treatment=4, plates=(1, 2, 3))
cfg = dict(tf.TINY, input_size=32, epochs=2, num_workers=2)
try:
    tf.train_tiny(s, root / "m", cfg, device="cuda", threads=4, fail_after_epoch=0)
except RuntimeError as e:
    print("cut:", e)
w = tf.train_tiny(s, root / "m", cfg, device="cuda", threads=4)
print("resumed ok", w["model_config"]["backbone"], (root / "m" / "ckpt" / ".lock").exists())
import h5py
with h5py.File(s.stacks[0], "r+") as f:  # damage every site (training reads one random site per well)
    for i in range(f["images"].shape[0]):
        img = f["images"][i]; img[0, 0, 0] ^= 255; f["images"][i] = img
try:
    tf.train_tiny(s, root / "m2", cfg, device="cuda", threads=4)
    raise SystemExit("FAIL: a damaged stack was used")
except InputError as e:
    print("damaged stack refused:", str(e).splitlines()[-1][:160])
PY
echo "smoke rc=$?"
[ -n "$SMOKE_ONLY" ] && exit 0  # SMOKE_ONLY=1: the CUDA smoke alone (~1 min)
B="python3 -m deepnoise bench train --input-size 512 --batch-size 64 --synthetic --num-workers 12 --device cuda --warmup 3"
for v in verify no-verify verify no-verify; do
  echo "=== legacy_xception --$v"
  timeout 80 $B --backbone legacy_xception --steps 30 --$v --json $OUT/x_$v.json | grep -E "images_per_s|ratio|memory"
done
echo "=== legacy_xception + mean teacher 64+64"
timeout 90 $B --backbone legacy_xception --mean-teacher --steps 20 --json $OUT/x_mt.json | grep -E "images_per_s|ratio|memory"
echo "=== xception_wide"
timeout 90 $B --backbone xception_wide --steps 20 --json $OUT/w.json | grep -E "images_per_s|ratio|memory"
echo "=== xception_wide + mean teacher 64+32"
timeout 100 $B --backbone xception_wide --mean-teacher --unlabelled-batch-size 32 --steps 20 --json $OUT/w_mt32.json | grep -E "images_per_s|ratio|memory"
