#!/usr/bin/env bash
# The GPU benchmark suite: one script, no network, < 8 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu_suite.sh [--out DIR]        # GPU: builtin:sdxl-random, 1024², 30 steps
#   bash benchmarks/gpu_suite.sh --cpu [--out DIR]  # CPU: builtin:tiny-sdxl, 64², 4 steps (make test runs this)
#
# The GPU box has torch, transformers, peft and accelerate but not diffusers, open_clip,
# controlnet-aux or ray, and cannot download. Prepare a `wheels/` folder in the repo root beforehand,
# on a machine with the package registry, for the GPU box's Python version, and carry it along:
#   pip download -d wheels --only-binary=:all: --python-version 3.11 \
#       diffusers==0.42.1 pydantic==2.14.4 ruamel.yaml==0.19.1 pillow psutil
# (dependencies are resolved, so huggingface-hub etc. come too; torch is not a dependency of these).
# The suite installs only what is missing, with `pip install --no-index --find-links wheels`.
# It uses castbook's in-process actor path (no Ray), `preprocess: false` control maps (no
# controlnet-aux) and the byte-level tokenizer fallback of builtin:sdxl-random (no open_clip).
#
# Runs: eager and compiled, each with a 2-LoRA stack and one ControlNet (plus, on GPU, a short
# 2-LoRA run without ControlNet for the ≤ 10 GB memory target); every figure is printed,
# and the results JSON files are written to --out DIR only (default runs/bench; on a device machine
# pass --out "$OUT" to bring them back).
set -euo pipefail

cd "$(dirname "$0")/.."
MODE=gpu
OUT_DIR=runs/bench
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) MODE=cpu; shift ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --cpu, --out DIR)" >&2; exit 2 ;;
  esac
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
SECONDS=0

echo "== castbook GPU suite (mode: $MODE, out: $OUT_DIR) =="
date -u +"%Y-%m-%dT%H:%M:%SZ"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; else echo "nvidia-smi: not available"; fi

# 1. dependencies: install only what is missing, only from a local wheels/ folder
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"diffusers": "diffusers==0.42.1", "pydantic": "pydantic", "ruamel.yaml": "ruamel.yaml",
        "safetensors": "safetensors", "peft": "peft", "transformers": "transformers",
        "PIL": "pillow", "numpy": "numpy"}
def missing(mod):
    try:
        return importlib.util.find_spec(mod) is None
    except ImportError:  # the parent package (e.g. ruamel) is absent
        return True
print(" ".join(pkg for mod, pkg in need.items() if missing(mod)))
EOF
)
if [[ -n "$missing" ]]; then
  if [[ -d wheels ]]; then
    echo "installing from wheels/: $missing"
    "$PY" -m pip install -q --no-index --find-links wheels $missing
  else
    echo "gpu_suite.sh: missing Python packages ($missing) and no wheels/ folder to install them from;" >&2
    echo "  prepare one with 'pip download --no-deps -d wheels ...' (see the top of this script)" >&2
    exit 3
  fi
fi
"$PY" - <<'EOF'
import torch, diffusers, transformers, peft
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for mod in ("open_clip", "controlnet_aux", "ray"):
    try:
        __import__(mod)
        print(f"{mod}: present")
    except ImportError:
        print(f"{mod}: absent (not needed by the suite)")
EOF

# 2. the benchmarks
if [[ "$MODE" == cpu ]]; then
  BASE=(--model builtin:tiny-sdxl --size 64 --steps 4 --device cpu --out "$OUT_DIR")
  RUNS=(
    "eager|--images 2 --loras 2 --controlnet --no-switch-both"
    "compiled|--images 2 --loras 2 --controlnet --compile --compile-backend eager --no-switch-both"
  )
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_suite.sh: no CUDA device; run with --cpu for the CPU version" >&2
    exit 4
  fi
  BASE=(--model builtin:sdxl-random --size 1024 --steps 30 --dtype bf16 --out "$OUT_DIR")
  # memory: the ≤ 10 GB target is SDXL bf16 + 2 LoRAs (no ControlNet, whose weights are resident).
  # compiled: mode "default"; max-autotune would spend most of the 8-minute budget autotuning kernels.
  RUNS=(
    "memory (2 LoRAs, no ControlNet)|--images 2 --loras 2 --no-switch-both"
    "eager|--images 5 --loras 2 --controlnet --batch 2"
    "compiled|--images 5 --loras 2 --controlnet --compile --compile-mode default"
  )
fi

for run in "${RUNS[@]}"; do
  name="${run%%|*}"; flags="${run#*|}"
  echo
  echo "== bench: $name (t+${SECONDS}s) =="
  # shellcheck disable=SC2086
  "$PY" -m castbook bench "${BASE[@]}" $flags
done

echo
echo "== results JSON =="
ls -1 "$OUT_DIR"/*.json
echo "suite finished in ${SECONDS}s"
