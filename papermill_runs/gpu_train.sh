#!/usr/bin/env bash
# Train the default model on a GPU machine that has PyTorch but nothing else we need and no network.
# Run from the repository root (or a `git archive` snapshot of it; DATA and WHL then point back) with:
#   .whl/     wheels for what the machine lacks (fastai, fastcore, papermill, ipykernel, pydicom, ...)
#   .bundle/  the prepared corpus (cxr-covid prepare ../shared/data/cxr-train --out .bundle/cxr-train-350)
# The run writes papermill_runs/runs/<UTC timestamp>/ and its figures to nbs/figures/runs/<UTC timestamp>/;
# both, packed, go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
EPOCHS=${EPOCHS:-15}; SIZE=${SIZE:-350}; ARCH=${ARCH:-resnet50}; BS=${BS:-64}; FREEZE=${FREEZE:-1}
RECIPE=${RECIPE:-robust}   # the recipe of the model trained (paper or robust)
# CROSSVAL=1 first runs the leave-one-site-out comparison of the robust and paper recipes (crossval.ipynb) and keeps
# its summary in the model's metrics and card; CV_* size it (each fold trains one model).
CROSSVAL=${CROSSVAL:-1}; CV_ARCH=${CV_ARCH:-$ARCH}; CV_SIZE=${CV_SIZE:-$SIZE}; CV_EPOCHS=${CV_EPOCHS:-$EPOCHS}
DATA=${DATA:-$PWD/.bundle/cxr-train-350}
WHL=${WHL:-.whl}
if [ -d "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export MPLBACKEND=Agg
python3 - <<'PY'
import torch, fastai, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'fastai', fastai.__version__,
      'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
PY
python3 -c "import cxr_covid_nbdev.train, cxr_covid_nbdev.inference, cxr_covid_nbdev.model_card, papermill, ipykernel"
CVJSON=''
DATA_REL=$(python3 -c "import os, sys; print(os.path.relpath(sys.argv[1], 'papermill_runs'))" "$DATA")
if [ "$CROSSVAL" = 1 ]; then
  CVTS=$(date -u +%Y%m%dT%H%M%SZ); CVRUN=papermill_runs/runs/$CVTS; mkdir -p "$CVRUN"
  python3 -m papermill papermill_runs/crossval.ipynb "$CVRUN/crossval.ipynb" --cwd papermill_runs --log-output \
    -p data "$DATA_REL" -p out_dir "runs/$CVTS" -p arch "$CV_ARCH" -p size "$CV_SIZE" -p epochs "$CV_EPOCHS" \
    -p freeze_epochs "$FREEZE" -p bs "$BS" -p per_class None -p pretrained False
  CVJSON="runs/$CVTS/crossval.json"
  sleep 1
fi
TS=$(date -u +%Y%m%dT%H%M%SZ)
RUN=papermill_runs/runs/$TS
mkdir -p "$RUN"
python3 -m papermill papermill_runs/train.ipynb "$RUN/train.ipynb" --cwd papermill_runs --log-output \
  -p data "$DATA_REL" -p out_dir "runs/$TS" -p arch "$ARCH" -p size "$SIZE" -p epochs "$EPOCHS" -p recipe "$RECIPE" \
  -p crossval "$CVJSON" -p freeze_epochs "$FREEZE" -p bs "$BS" -p pretrained False -p num_workers 12 ${EXTRA_PARAMS:-}
# the data set's own record (size, sources) and its prepare report (skipped files, near-duplicates) go with the run
if [ -f "$DATA/prepare.json" ]; then cp "$DATA/prepare.json" "$RUN/prepare.json"; fi
if [ -f "$DATA/report.json" ]; then cp "$DATA/report.json" "$RUN/prepare_report.json"; fi
tar czf - "$RUN" "nbs/figures/runs/$TS" ${CVRUN:+"$CVRUN" "nbs/figures/runs/$CVTS"} | split -b 15M -d - "$OUT/run.tgz.part"   # unpack at the repository root
ls -la "$OUT"
