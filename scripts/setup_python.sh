#!/usr/bin/env bash
# Creates (or reuses) the Python virtualenv used only to PRODUCE golden data:
# torch + transformers + safetensors + gguf + numpy, pinned so that the fixtures
# in tests/fixtures/ can be regenerated bit for bit with the versions that made them.
# Idempotent: re-running with everything installed only checks the pins.
# Prints the venv's python path as its last line of output.
set -euo pipefail

AUTOQUANT_HOME="${AUTOQUANT_HOME:-$HOME/.cache/autoquant}"
VENV="$AUTOQUANT_HOME/venv"
PY="${PYTHON:-python3}"

# Top-level packages the golden scripts import.
REQUIREMENTS=(
  "torch==2.15.0"
  "transformers==5.24.0"
  "safetensors==0.8.0"
  "gguf==0.19.0"
  "numpy==2.4.6"
  # transformers refuses to load a GGUF file without accelerate.
  "accelerate==1.15.0"
  # bitsandbytes golden data (scripts/golden/make_bnb_golden.py); CPU backend, deps already pinned.
  "bitsandbytes==0.50.2"
)

# Full `pip freeze` of the install that produced the committed fixtures, used as
# constraints: dependencies resolve to exactly these versions (packages not needed
# on a given platform, e.g. the CUDA wheels, are simply not installed).
CONSTRAINTS="
accelerate==1.15.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
cuda-bindings==13.5.0
cuda-pathfinder==1.9.1
cuda-toolkit==13.2.2
filelock==4.3.1
fsspec==2026.9.0
gguf==0.19.0
h11==0.16.0
hf-xet==1.8.0
httpcore2==2.16.2
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
Jinja2==3.1.6
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
mpmath==1.3.0
networkx==3.6.1
numpy==2.4.6
nvidia-cublas==13.4.1.3
nvidia-cuda-cccl==13.3.5.0.6
nvidia-cuda-cupti==13.2.86
nvidia-cuda-nvrtc==13.2.86
nvidia-cuda-runtime==13.2.86
nvidia-cudnn-cu13==9.26.0.51
nvidia-cufft==12.2.0.57
nvidia-cufile==1.17.1.22
nvidia-cusolver==12.2.0.11
nvidia-cusparse==12.7.10.12
nvidia-cusparselt-cu13==0.8.1
nvidia-nccl-cu13==2.30.7
nvidia-nvjitlink==13.5.37
nvidia-nvshmem-cu13==3.7.2
nvidia-nvtx==13.2.86
packaging==26.4
psutil==7.2.2
pydantic==2.14.4
pydantic_core==2.50.5
Pygments==2.21.0
PyYAML==6.0.4
regex==2026.11.19
requests==2.34.2
rich==15.0.0
safetensors==0.8.0
shellingham==1.5.4
sympy==1.14.0
tokenizers==0.23.3
torch==2.15.0
tqdm==4.70.1
transformers==5.24.0
triton==3.9.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
"

log() { echo "setup_python: $*" >&2; }

if ! command -v "$PY" >/dev/null 2>&1; then
  log "error: $PY not found; install Python 3.10+ (e.g. apt-get install python3 python3-venv)"
  exit 1
fi

mkdir -p "$AUTOQUANT_HOME"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv at $VENV"
  if ! "$PY" -m venv "$VENV"; then
    log "error: '$PY -m venv' failed; on Debian/Ubuntu install the python3-venv package"
    exit 1
  fi
else
  log "reusing virtualenv at $VENV"
fi

VPY="$VENV/bin/python"

# Skip pip entirely when every pin is already satisfied (fast, works offline).
if "$VPY" - "${REQUIREMENTS[@]}" <<'PYCHECK' 2>/dev/null; then
import sys
from importlib.metadata import version, PackageNotFoundError
for req in sys.argv[1:]:
    name, want = req.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYCHECK
  log "pinned packages already installed"
else
  CONSTRAINTS_FILE="$(mktemp)"
  trap 'rm -f "$CONSTRAINTS_FILE"' EXIT
  printf '%s\n' "$CONSTRAINTS" > "$CONSTRAINTS_FILE"
  log "installing ${REQUIREMENTS[*]} (this downloads ~3 GB the first time)"
  "$VPY" -m pip install "pip==26.3" >&2
  "$VPY" -m pip install -c "$CONSTRAINTS_FILE" "${REQUIREMENTS[@]}" >&2
fi

# AutoGPTQ's QuantLinear (GPTQ golden data and scripts/interop). --no-deps: only two of its module
# files are loaded, and its declared dependencies would move the pins above.
if ! "$VPY" -c 'import sys; from importlib.metadata import version; sys.exit(version("auto-gptq") != "0.7.1")' 2>/dev/null; then
  "$VPY" -m pip install --no-deps "auto-gptq==0.7.1" >&2
fi

# AutoAWQ's packers and dequantizer (scripts/golden/make_awq_golden.py); --no-deps for the same reason.
if ! "$VPY" -c 'import sys; from importlib.metadata import version; sys.exit(version("autoawq") != "0.2.7.post3")' 2>/dev/null; then
  "$VPY" -m pip install --no-deps "autoawq==0.2.7.post3" >&2
fi

# Smoke test: the imports the golden scripts need.
"$VPY" -c 'import torch, transformers, safetensors, gguf, numpy' >&2

echo "$VPY"
