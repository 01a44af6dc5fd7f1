#!/usr/bin/env bash
# amx_check.sh - build ktsft with plain Meson + Ninja (meson-python not needed) and run the
# AMX-relevant tests natively, with KTSFT_ISA unset; prints whether `amx` was detected and
# granted by the OS. About 1-3 minutes.
#
#   bash benchmarks/amx_check.sh [PYTHON]      (PYTHON defaults to $PYTHON or python3)
#
# Needs: numpy, ml_dtypes, pytest, hypothesis (torch optional), meson, ninja, cython, a C
# compiler with -mamx-tile (GCC >= 11, Clang >= 12). Builds into build-amx-check/ (or
# $KTSFT_AMX_BUILD) and leaves the source tree alone.
set -euo pipefail
PY=${1:-${PYTHON:-python3}}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${KTSFT_AMX_BUILD:-$ROOT/build-amx-check}
unset KTSFT_ISA

"$PY" -c "import numpy, ml_dtypes, pytest, hypothesis" || {
  echo "amx_check: $PY lacks one of numpy, ml_dtypes, pytest, hypothesis" >&2
  exit 2
}
if "$PY" -c "import mesonbuild" 2>/dev/null; then
  MESON=("$PY" -m mesonbuild.mesonmain) # Meson's python module then finds this interpreter
else
  MESON=(meson)
fi
echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "== amx flags in /proc/cpuinfo: $(grep -m1 -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"

if [ ! -f "$BUILD/build.ninja" ]; then
  "${MESON[@]}" setup "$BUILD" "$ROOT" -Dbuildtype=release >"$BUILD.setup.log" 2>&1 || {
    cat "$BUILD.setup.log" >&2
    exit 1
  }
fi
grep -i "AMX intrinsics" "$BUILD/meson-logs/meson-log.txt" | tail -1 || true
ninja -C "$BUILD" >/dev/null

# An importable package: the Python sources next to the freshly built extension.
PKG="$BUILD/pkg"
rm -rf "$PKG" && mkdir -p "$PKG/ktsft"
ln -s "$ROOT"/ktsft/*.py "$ROOT"/ktsft/*.pyi "$ROOT"/ktsft/py.typed "$PKG/ktsft/"
ln -s "$BUILD"/ktsft/_core*.so "$PKG/ktsft/"
cd "$PKG" # so that the source tree's ktsft/ (no extension) is not imported instead

PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import time
import numpy as np
import ktsft
from ktsft import _core

compiled, available, best = _core.isa_lists()
print("== compiled:", compiled)
print("== available:", available, " auto picks:", best)
print("== amx permission / status:", _core.amx_status())
print("== cpu features:", " ".join(_core.cpu_features()))
if "amx" in available:
    print("== AMX DETECTED AND GRANTED: the amx family runs natively")
else:
    print("== amx NOT available here; only amx-emu is tested")

# A rough timing of one forward + backward per family (not a benchmark).
rng = np.random.default_rng(0)
E, k, H, I, r, T = 8, 4, 1024, 512, 8, 256  # noqa: E741
bf = ktsft._arrays.BF16
w = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I),
     "gate_lora_a": (E, r, H), "gate_lora_b": (E, I, r), "up_lora_a": (E, r, H),
     "up_lora_b": (E, I, r), "down_lora_a": (E, r, I), "down_lora_b": (E, H, r)}
p = {n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32).astype(bf)
     for n, s in w.items()}
x = rng.standard_normal((T, H)).astype(np.float32).astype(bf)
ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
rw = np.full((T, k), 1.0 / k, np.float32)
with ktsft.ThreadPool() as pool:
    for isa in [i for i in ("amx", "generic") if i in available]:
        for quant in ("bf16", "int8"):
            c = ktsft.MoESFTConfig(E, k, H, I, lora_rank=r, lora_alpha=16.0, max_len=T,
                                   quant=quant)
            moe = ktsft.MoESFT(c, pool=pool, isa=isa, **p)
            moe.forward(x, ids, rw, save_for_backward=True)
            moe.backward(x)
            t0 = time.perf_counter()
            moe.forward(x, ids, rw, save_for_backward=True)
            moe.backward(x)
            dt = time.perf_counter() - t0
            print(f"== {isa:8s} {quant}: forward+backward {dt * 1e3:8.1f} ms "
                  f"(T={T}, E={E}, k={k}, H={H}, I={I}, {pool.num_threads} threads)")
EOF

export HYPOTHESIS_PROFILE=ci
PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
  "$ROOT/tests/test_amx_emu.py" \
  "$ROOT/tests/test_engine.py" "$ROOT/tests/test_int8.py" "$ROOT/tests/test_activations.py" \
  -k amx
