#!/bin/bash
# One prepared check of d2ssod on a CUDA machine, run from the repository root
# (bash benchmarks/gpu_check.sh):
#   1. every demo method (Soft Teacher, UT, SED, Soft Teacher + SED, Efficient Teacher,
#      UT on the dense detector; Soft Teacher and Efficient Teacher also with SOLVER.AMP float16)
#      trains $SMOKE iterations (half burn-in, half semi-supervised) and evaluates on the device;
#   2. tools/predict.py runs the final Soft Teacher teacher on the validation images there;
#   3. benchmarks/benchmark_step.py times each demo config's step (and the R50-FPN GPU recipe on
#      the demo images, random init) into $OUT/step_$DEV.json;
#   4. a whole demo-schedule Soft Teacher run in the time left of $BUDGET seconds.
# Progress in $OUT/progress.txt, per-run lines in $OUT/smoke.txt, failures' log tails in
# $OUT/fail_*.txt. DEV=cpu runs the same on the CPU (to check the script itself: SMOKE=20
# ITERS=1 WARM=0 BUDGET=0). On a machine without package registries, put the wheels that
# Detectron2 and d2ssod need (requirements.txt, and the pure wheel tools/install_detectron2.py
# repacks) into .whl/: when Detectron2 is not importable they are installed into /tmp/site.
DEV=${DEV:-cuda}; OUT=${OUT:-/tmp/gpu_out}; ITERS=${ITERS:-20}; SMOKE=${SMOKE:-60}
rm -rf /tmp/o; mkdir -p $OUT /tmp/o
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
if ! python3 -c "import detectron2" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/env.txt
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
python3 -c "import torch, torchvision, detectron2, d2ssod, numpy, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'tv', torchvision.__version__, 'd2', detectron2.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" >> $OUT/env.txt 2>&1
cat $OUT/env.txt
stamp setup done
python3 datasets/prepare_demo.py > /tmp/o/data.txt 2>&1 || { tail -20 /tmp/o/data.txt; exit 1; }
stamp data done
# 1. smoke: every method trains through burn-in into SSOD, evaluates, on $DEV (4 at a time)
smoke() {  # name config extra...
  local n=$1 c=$2; shift 2
  timeout 240 python3 tools/train_net.py --config-file configs/demo/$c.yaml MODEL.DEVICE $DEV \
    SOLVER.MAX_ITER $SMOKE SSOD.BURN_IN_ITERS $((SMOKE/2)) SOLVER.STEPS "($((SMOKE-10)),)" TEST.EVAL_PERIOD $SMOKE \
    SOLVER.CHECKPOINT_PERIOD 100000 DATALOADER.NUM_WORKERS 2 OUTPUT_DIR /tmp/o/$n "$@" > /tmp/o/$n.log 2>&1
  local rc=$?
  echo "$n rc=$rc AP,AP50,AP75,APs,APm,APl: $(grep -E 'copypaste: [0-9]' /tmp/o/$n.log | tail -1 | awk '{print $NF}')" >> $OUT/smoke.txt
  [ $rc = 0 ] || tail -40 /tmp/o/$n.log > $OUT/fail_$n.txt
}
[ -z "$SKIP_SMOKE" ] && { smoke soft_teacher soft_teacher & smoke unbiased_teacher unbiased_teacher & smoke sed sed & smoke efficient_teacher efficient_teacher &
wait
smoke soft_teacher_amp soft_teacher SOLVER.AMP.ENABLED True & smoke efficient_teacher_amp efficient_teacher SOLVER.AMP.ENABLED True &
smoke dense_unbiased_teacher dense_unbiased_teacher & smoke soft_teacher_sed soft_teacher_sed &
wait; }
stamp smoke done; cat $OUT/smoke.txt
# predictor on the final teacher, on the device
timeout 120 python3 tools/predict.py --config-file configs/demo/soft_teacher.yaml --weights /tmp/o/soft_teacher/model_final.pth \
  --input 'datasets/demo/images/val_*.jpg' --images-json datasets/demo/val.json --output-dir /tmp/o/pred MODEL.DEVICE $DEV > /tmp/o/pred.log 2>&1
echo "predict rc=$? $(tail -2 /tmp/o/pred.log | tr '\n' ' ' | cut -c1-300)" >> $OUT/smoke.txt
stamp predict done
# 2. step times, one at a time: bench LABEL CONFIG [--amp] [KEY VALUE ...]
bench() {
  local l=$1 c=$2; shift 2
  timeout 150 python3 -m benchmarks.benchmark_step --config-file $c --iters $ITERS --warmup ${WARM:-5} \
    --output $OUT/step_$DEV.json --label "$l@$DEV" "$@" MODEL.DEVICE $DEV DATALOADER.NUM_WORKERS 4 \
    > /tmp/o/b_$l.log 2>&1 || tail -30 /tmp/o/b_$l.log > $OUT/fail_b_$l.txt
  stamp "bench $l: $(python3 -c "import json;print(json.load(open('$OUT/step_$DEV.json'))['$l@$DEV']['median_seconds'])" 2>&1 | tail -1)"
}
# the GPU recipe (R50-FPN, 800 px, 4 + 8 images) on the demo images, random init (no ImageNet
# R50 offline)
CUSTOM=(MODEL.WEIGHTS "" DATASETS.CUSTOM.LABELED_JSON datasets/demo/labeled.json
        DATASETS.CUSTOM.IMAGE_ROOT datasets/demo/images DATASETS.CUSTOM.UNLABELED_DIR datasets/demo/images
        DATASETS.CUSTOM.VAL_JSON datasets/demo/val.json)
if [ -z "$SKIP_BENCH" ]; then
  for m in supervised soft_teacher unbiased_teacher sed soft_teacher_sed dense_supervised efficient_teacher dense_unbiased_teacher; do
    bench $m configs/demo/$m.yaml
  done
  bench soft_teacher+amp configs/demo/soft_teacher.yaml --amp
  bench efficient_teacher+amp configs/demo/efficient_teacher.yaml --amp
  bench supervised_gpu_r50 configs/custom/supervised_gpu.yaml "${CUSTOM[@]}"
  bench soft_teacher_gpu_r50 configs/custom/soft_teacher_gpu.yaml "${CUSTOM[@]}"
  bench soft_teacher_gpu_r50+amp configs/custom/soft_teacher_gpu.yaml --amp "${CUSTOM[@]}"
fi
# a whole demo-schedule Soft Teacher run on the device (wall time and AP), in what time is left
LEFT=$(( ${BUDGET:-520} - ($(date +%s) - T0) ))
stamp "full soft_teacher run with ${LEFT} s left"
if [ $LEFT -gt 60 ]; then
  timeout $LEFT python3 tools/train_net.py --config-file configs/demo/soft_teacher.yaml MODEL.DEVICE $DEV DATALOADER.NUM_WORKERS 4 OUTPUT_DIR /tmp/o/full_st > /tmp/o/full_st.log 2>&1
  echo "rc=$?" >> $OUT/full_st.txt; grep -E "copypaste: [0-9]|Overall training speed|Total training time|eta" /tmp/o/full_st.log | tail -12 >> $OUT/full_st.txt
  cp /tmp/o/full_st/metrics.json $OUT/full_st_metrics.json 2>/dev/null
fi
stamp all done
