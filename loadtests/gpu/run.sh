#!/usr/bin/env bash
# Governor's first GPU run (issue N), one prepared script; each step writes its results under $WORK and
# pack() copies them into $OUT as one archive after every step, so a run cut short keeps what it measured
# (the device tool brings back at most 8 files). The host has torch + CUDA but no vLLM and no network:
# loadtests/gpu/make_bundle.sh (run where pip works) makes the parts this script installs from.
#   BUNDLE=/root/gov OUT=/tmp/gpu-out bash loadtests/gpu/run.sh
# STEPS picks steps (default: all, in order); KEEP=1 leaves `governor serve` running (setsid) so a later
# call can run the eval against it. A CPU rehearsal of the plumbing (tiny loads): REHEARSAL=1.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=${BUNDLE:-/root/gov}
OUT=${OUT:-/tmp/gpu-out}
STEPS=${STEPS:-install synth serve smoke load eval final}
BUDGET=${BUDGET:-560}   # seconds for this call; the load and eval steps shrink to fit
GW=http://127.0.0.1:8000
ENGINE=http://127.0.0.1:8100
REHEARSAL=${REHEARSAL:-}
DEVICE=gpu; LOAD_ARGS="--concurrency 64 256 --reps 3 --waves 1.5"; EVAL_ARGS="--concurrency 128"; SYNTH_ARGS="--steps 5 --batch 8 --batch 256 --batch 1024"
if [ -n "$REHEARSAL" ]; then
  DEVICE=cpu; LOAD_ARGS="--concurrency 4 --reps 1 --waves 1"; EVAL_ARGS="--concurrency 8 --limit 1 --seeds 1"
  SYNTH_ARGS="--steps 2 --batch 8 --batch 64"
fi
# The eval: the default configs, plus processor variants without the loop cut (the cut only truncates,
# so its settings can be tuned offline on these answers) and the cut alone.
VARIANTS=(
  "balanced+loop_detection=false" "strict+loop_detection=false" "off+loop_detection=true"
  "balanced+dry_multiplier=1.5+loop_detection=false"
  "balanced+rep_penalty=1.15+rep_window=128+loop_detection=false"
  "balanced+dry_breakers=[\":\",\"\\\"\",\"*\"]+loop_detection=false"
  "balanced+ngram_size=4+ngram_window=256+loop_detection=false"
)
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
pack() { tar -czf "$OUT/gpu-run.tgz.tmp" -C "$WORK" . && mv "$OUT/gpu-run.tgz.tmp" "$OUT/gpu-run.tgz"; }
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$WORK/steps.log"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
has() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$REPO"

X=$BUNDLE/x
if has install && [ -z "$REHEARSAL" ] && [ ! -f "$X/.done" ]; then
  log "0. install from the bundle"
  mkdir -p "$X" && cat "$BUNDLE"/part.* | tar -x -C "$X" || { log "bundle broken"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$X"/whl/*.whl >"$WORK/pip.log" 2>&1 \
    || log "pip install failed (see pip.log)"
  python3 -c "import tarfile; tarfile.open('$X/vllm.tar.xz').extractall('/tmp/site')" && touch "$X/.done"
fi
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
ulimit -n "$(ulimit -Hn)" 2>/dev/null; log "open files limit $(ulimit -n)"  # the first run ran out at ~830 clients
if [ -z "$REHEARSAL" ]; then export PYTHONPATH=/tmp/site:$REPO/server GOVERNOR_CACHE_DIR=/root/gcache; fi
CACHE=${GOVERNOR_CACHE_DIR:-$HOME/.cache/governor}
if has install; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version
    python3 -c "import torch, vllm, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
  } >"$WORK/machine.txt" 2>&1
  cat "$WORK/machine.txt"; pack
fi

if has synth; then
  log "1. model (background) + synthetic processor bench on the GPU"
  PIP_NO_INDEX=1 PIP_FIND_LINKS=$X python3 -m governor model prepare >"$WORK/model.log" 2>&1 &
  MODEL_PID=$!
  wait $MODEL_PID || { log "model prepare failed"; tail -n 20 "$WORK/model.log"; }  # the bench reads its vocab
  timeout 75 python3 -m governor bench processors --synthetic --device $([ $DEVICE = gpu ] && echo cuda || echo cpu) \
    $SYNTH_ARGS >"$WORK/synthetic.json" 2>"$WORK/synthetic.log" || log "synthetic bench failed or timed out"
  tail -n 2 "$WORK/synthetic.json" | cut -c1-1500
  pack
fi

ready() { python3 -c "import httpx,sys; sys.exit(httpx.get('$GW/ready', timeout=5).status_code != 200)" 2>/dev/null; }
if has serve && ! ready; then
  log "2. governor serve on the $DEVICE (engine on $ENGINE, gateway on $GW)"
  GOVERNOR_ADDRESS_CONCURRENCY=0 GOVERNOR_MAX_RUNNING=1024 GOVERNOR_MAX_QUEUED=4096 \
    setsid python3 -m governor serve --device $DEVICE --engine-port 8100 --no-lora --no-watch-adapters \
    $([ $DEVICE = gpu ] && echo --gpu-memory-utilization 0.5 || echo --enforce-eager) >"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 300); do
    ready && break
    kill -0 $SERVE_PID 2>/dev/null || { log "serve died"; tail -n 60 "$WORK/serve.log"; pack; exit 3; }
    sleep 1
  done
  log "ready"; pack
fi
ENGINE_PID=$(pgrep -f 'vllm.entrypoints.openai.api_server' | head -1)
ENGINE_KEY=$(tr '\0' '\n' </proc/"$ENGINE_PID"/environ 2>/dev/null | sed -n 's/^VLLM_API_KEY=//p')

if has smoke; then
  log "3. smoke: /ready, chat + completions per preset, /metrics"
  timeout 90 python3 loadtests/gpu/smoke.py --url $GW --out "$WORK/smoke.json" >/dev/null 2>"$WORK/smoke.log" \
    || log "smoke failed: $(python3 -c "import json; print(json.load(open('$WORK/smoke.json'))['failures'])" 2>&1)"
  cut -c1-300 "$WORK/smoke.json" | head -n 30; pack
fi

if has load; then
  log "4. load: direct vs gateway (off); balanced/strict on every request vs off (direct, processors only)"
  for preset in balanced strict; do
    python3 - "$preset" "$CACHE" >"$WORK/body-$preset.json" <<'PY'
import json, sys
from pathlib import Path
from governor.bench.processors import build_policy
from governor.settings import Settings
policy = build_policy(Settings(), Path(sys.argv[2]) / "models/SmolLM2-135M-Instruct")
body = policy.build({"model": "m", "prompt": "x", "decoding_preset": sys.argv[1]}, kind="completions").body
print(json.dumps({k: v for k, v in body.items() if k not in ("model", "prompt")}))
PY
  done
  LOAD_S=$(( $(left) - 15 ))
  timeout $LOAD_S python3 loadtests/gpu/stream_load.py --engine-url $ENGINE --engine-key "$ENGINE_KEY" \
    --side "direct=$ENGINE" --side "gateway=$GW;{\"decoding_preset\": \"off\"}" \
    --side "direct+balanced=$ENGINE;$(cat "$WORK/body-balanced.json")" \
    --side "direct+strict=$ENGINE;$(cat "$WORK/body-strict.json")" \
    $LOAD_ARGS --out "$WORK/load.jsonl" >"$WORK/load.log" 2>&1 || log "load cut at ${LOAD_S}s"
  grep summary "$WORK/load.jsonl" | cut -c1-330; pack
fi

if has eval; then
  log "5. eval: four processes in parallel (greedy/t=0.7 x defaults/variants), answers kept"
  # 4 x 208 connections ran the first run out of file descriptors: EVAL_ARGS can lower --concurrency.
  EVAL_S=$(( $(left) - 20 ))
  VCONF=(); for v in "${VARIANTS[@]}"; do VCONF+=(--config "$v"); done
  run_eval() {  # name temperature config-args...
    local name=$1 t=$2; shift 2
    timeout $EVAL_S python3 -m governor eval loops --url $GW --temperature "$t" $EVAL_ARGS "$@" \
      --answers "$WORK/eval-$name.jsonl" --details >"$WORK/eval-$name.txt" 2>"$WORK/eval-$name.log"
  }
  run_eval greedy 0 & run_eval sampled 0.7 & run_eval greedy-variants 0 "${VCONF[@]}" &
  run_eval sampled-variants 0.7 --seeds 1 "${VCONF[@]}" &
  wait
  grep -h '^#' "$WORK"/eval-*.log | cut -c1-200; pack
fi

if has final; then
  log "6. final metrics"
  python3 -c "import httpx; print(httpx.get('$GW/metrics').text)" >"$WORK/metrics-end.txt" 2>&1
  nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
  cp "$CACHE"/logs/engine-*.log "$WORK/" 2>/dev/null
  pkill -f 'governor serve'; sleep 3
  log "done"; pack
fi
