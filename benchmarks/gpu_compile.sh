#!/bin/bash
# Issue 15 item 4, on a machine with one CUDA GPU (run from the repository root): a faster GPU step?
# Side by side in one run: eager vs torch.compile (train.compile / bench --compile) vs a larger batch,
# for legacy_xception and xception_wide, with and without the mean teacher, at 512 px, 5 alternating
# repeats each (median, min, max), the loader ratio printed (keep >= 0.95). Writes $OUT/compile.tsv and
# $OUT/compile.md (the table for docs/figures.md). BACKBONES="legacy_xception" runs one backbone (the
# table collects every JSON under $OUT). Not run yet: no GPU was lent to a session since.
set -o pipefail
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
if ls .whl/timm-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/timm-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/scripts PYTHONUNBUFFERED=1
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
B="python3 -m deepnoise bench train --input-size 512 --synthetic --num-workers 12 --device cuda --warmup 5 --steps 15 --repeats 5"
for backbone in ${BACKBONES:-legacy_xception xception_wide}; do
  for mt in no-mean-teacher mean-teacher; do
    for setting in "eager:--batch-size 64 --no-compile" "compile:--batch-size 64 --compile" "batch128:--batch-size 128 --no-compile"; do
      name=${setting%%:*}; flags=${setting#*:}
      echo "=== $backbone --$mt $name"
      timeout 300 $B --backbone $backbone --$mt $flags --json "$OUT/${backbone}_${mt}_${name}.json" \
        | grep -E "images_per_s|ratio|memory" || echo "FAILED rc=$?"
    done
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["backbone\tmean_teacher\tsetting\tbatch\tfull_step_img_s\tmin\tmax\tmodel_step_img_s\tloader_ratio"]
md = ["| backbone | mean teacher | setting | batch | full step img/s (median [min, max] of 5) | model step img/s | loader ratio |",
      "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
for f in sorted(out.glob("*_*-teacher_*.json")):
    r = json.loads(f.read_text())
    setting = f.stem.rsplit("_", 1)[1]
    mt = "yes" if "_mean-teacher_" in f.name else "no"
    rows.append(f"{r['backbone']}\t{mt}\t{setting}\t{r['batch_size']}\t{r['full_step_images_per_s']:.0f}\t"
                f"{r['full_step_images_per_s_min']:.0f}\t{r['full_step_images_per_s_max']:.0f}\t"
                f"{r['model_step_images_per_s']:.0f}\t{r['ratio_full_over_model']:.3f}")
    md.append(f"| {r['backbone']} | {mt} | {setting} | {r['batch_size']} | {r['full_step_images_per_s']:.0f} "
              f"[{r['full_step_images_per_s_min']:.0f}, {r['full_step_images_per_s_max']:.0f}] | "
              f"{r['model_step_images_per_s']:.0f} | {r['ratio_full_over_model']:.3f} |")
(out / "compile.tsv").write_text("\n".join(rows) + "\n")
(out / "compile.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
