"""Native check of the AMX kernel GEMMs with only a C compiler and NumPy (no Meson, no pytest).

Compiles the C library with ``cc`` into a temporary shared library, then runs each kernel GEMM
(``kt_gemm_test``: "x W^T" bf16, int8, "x W" bf16 and int8 weights) on ``amx``, ``generic`` and
``amx-emu`` and compares them. ``benchmarks/amx_check.sh`` runs it first; on its own:

    python3 benchmarks/amx_kernel_check.py

Exit status 0 when every GEMM agrees (or when the CPU has no AMX: then only amx-emu runs).
"""

from __future__ import annotations

import ctypes as C
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERIC, AMX, AMX_EMU = 0, 3, 4
NT, NT_Q8, NN = 0, 1, 2


def build(out: pathlib.Path) -> C.CDLL:
    cc = os.environ.get("CC", "cc")
    flags = ["-O2", "-fPIC", f"-I{ROOT}/src_c/include", f"-I{ROOT}/src_c", "-DKT_HAVE_AMX"]
    srcs = [*sorted((ROOT / "src_c").glob("*.c"))]
    srcs += [ROOT / "src_c/kernels" / f for f in ("gemm_generic.c", "act_generic.c", "amx_emu.c")]
    objs = []
    for i, src in enumerate(srcs):
        objs.append(out / f"{i}.o")
        subprocess.run([cc, *flags, "-c", str(src), "-o", str(objs[-1])], check=True)
    amx = ROOT / "src_c/kernels/gemm_amx.c"
    for name, extra in (
        ("amx", ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]),
        ("emu", ["-DKT_AMX_EMULATE"]),
    ):
        objs.append(out / f"{name}.o")
        subprocess.run([cc, *flags, *extra, "-c", str(amx), "-o", str(objs[-1])], check=True)
    lib = out / "libktsft_check.so"
    subprocess.run([cc, "-shared", *map(str, objs), "-o", str(lib), "-lm", "-lpthread"], check=True)
    return C.CDLL(str(lib))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(pathlib.Path(tmp))
        lib.kt_cpu_amx_status.restype = C.c_char_p
        has_amx = bool(lib.kt_isa_available(AMX))
        print("amx status:", lib.kt_cpu_amx_status().decode(), "| amx available:", has_amx)
        err = C.create_string_buffer(1024)

        def ptr(a):
            return C.c_void_p(0 if a is None else a.ctypes.data)

        def gemm(isa, op, a, w, n0, n, sa=None, sw=None):
            c = np.full((a.shape[0], n), np.nan, np.float32)
            i64 = C.c_int64
            st = lib.kt_gemm_test(
                isa,
                op,
                ptr(a),
                ptr(sa),
                i64(a.shape[0]),
                ptr(w),
                ptr(sw),
                i64(w.shape[0]),
                i64(w.shape[1]),
                int(w.dtype == np.int8),
                i64(n0),
                i64(n),
                ptr(c),
                err,
            )
            if st != 0:
                raise RuntimeError(err.raw[4:300].split(b"\0")[0].decode())
            return c

        rng = np.random.default_rng(0)

        def bf16(shape):
            f = rng.standard_normal(shape).astype(np.float32)
            return (f.view(np.uint32) >> 16).astype(np.uint16)

        failures = 0
        cases = [
            (1, 17, 33, 0, 17),
            (17, 33, 70, 5, 20),
            (33, 70, 130, 64, 6),
            (40, 130, 65, 16, 49),
            (300, 512, 256, 64, 64),
        ]
        for m, rows, cols, n0, n in cases:
            q = rng.integers(-127, 128, (m, cols), dtype=np.int8)
            wq = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
            sa, sw = rng.random(m, dtype=np.float32), rng.random(rows, dtype=np.float32)
            runs = {
                "nt bf16": (NT, bf16((m, cols)), bf16((rows, cols)), None, None),
                "nt int8": (NT_Q8, q, wq, sa, sw),
                "nn bf16": (NN, bf16((m, rows)), bf16((rows, cols)), None, None),
                "nn int8": (NN, bf16((m, rows)), wq, None, sw),
            }
            for name, (op, a, w, s_a, s_w) in runs.items():
                out_cols = cols if op == NN else rows
                nn = min(n, out_cols - n0)
                ref = gemm(GENERIC, op, a, w, n0, nn, s_a, s_w)
                scale = max(float(np.abs(ref).max()), 1e-30)
                for isa, label in ((AMX, "amx"), (AMX_EMU, "amx-emu")):
                    if isa == AMX and not has_amx:
                        continue
                    got = gemm(isa, op, a, w, n0, nn, s_a, s_w)
                    err_rel = float(np.abs(got - ref).max()) / scale
                    exact = op != NT_Q8 or np.array_equal(got, ref)
                    ok = not np.isnan(got).any() and err_rel < 1e-5 and exact
                    failures += not ok
                    print(
                        f"{name} m={m} W=[{rows},{cols}] cols [{n0},{n0 + nn}) {label:8s}"
                        f" max rel diff vs generic {err_rel:.1e} {'ok' if ok else 'FAIL'}"
                    )
        print("AMX kernel check:", "PASS" if failures == 0 else f"{failures} FAILED")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
