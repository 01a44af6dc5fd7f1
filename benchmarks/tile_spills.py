"""Register tiles whose accumulators live on the stack: a check of the compiled kernels.

Usage: python benchmarks/tile_spills.py [--min-arith N] [FILE ...]

A register tile keeps its accumulators in registers only if the compiler unrolls every loop
over the tile's rows and vectors (``KT_UNROLL`` in src_c/internal.h); where one stays rolled,
the accumulator array lives on the stack and each step of the inner loop stores it back, which
halved the speed of the avx2 ``x W`` tile. This disassembles FILE (default: the built
``ktsft._core`` extension) with ``objdump`` and lists every innermost loop that has at least N
vector multiply-adds or dot products (default 16) and stores vector registers to the stack in
its body, with the counts. Some tiles spill by design (avx2's int4 ``x W^T``, which needs more
than 16 ymm registers); a tile that did not spill before and does now is the regression this
looks for. Needs binutils' ``objdump``; x86-64 only.
"""

import argparse
import re
import subprocess
import sys

ARITH = re.compile(r"(vfmadd|vfnmadd|vpdpbusd|vdpbf16ps|vpmaddwd|vpmaddubsw)")
STACK_STORE = re.compile(r"vmov\w+\s+%[xyz]mm\d+,-?0x[0-9a-f]+\(%rsp\)")
JUMP = re.compile(r"j\w+\s+([0-9a-f]+)")


def functions(path):
    """{function: [(address, instruction)]} from objdump -d."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True
    ).stdout
    funcs, name = {}, None
    for line in out.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.+)>:", line)
        if head:
            name = head.group(2)
            funcs[name] = []
            continue
        ins = re.match(r"^\s+([0-9a-f]+):\s+(.*)$", line)
        if ins and name:
            funcs[name].append((int(ins.group(1), 16), ins.group(2)))
    return funcs


def spilling_loops(path, min_arith):
    """(function, start, end, instructions, stack stores, arithmetic) of each innermost loop
    (a backward jump with no other backward jump inside it) that spills."""
    found = []
    for name, ins in functions(path).items():
        for addr, text in ins:
            jump = JUMP.match(text)
            if not jump or int(jump.group(1), 16) >= addr:
                continue
            start = int(jump.group(1), 16)
            body = [t for a, t in ins if start <= a <= addr]
            inner = any(
                (m := JUMP.match(t)) and start <= int(m.group(1), 16) < a
                for a, t in ins
                if start <= a < addr
            )
            if inner:
                continue
            stores = sum(bool(STACK_STORE.match(t)) for t in body)
            arith = sum(bool(ARITH.match(t)) for t in body)
            if stores and arith >= min_arith:
                found.append((name, start, addr, len(body), stores, arith))
    return found


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", help="objects or shared libraries (default: _core)")
    parser.add_argument("--min-arith", type=int, default=16)
    args = parser.parse_args()
    files = args.files
    if not files:
        import ktsft._core

        files = [ktsft._core.__file__]
    total = 0
    for path in files:
        for name, start, end, n, stores, arith in spilling_loops(path, args.min_arith):
            print(
                f"{name:32s} loop {start:x}-{end:x}: {n} instructions, {arith} multiply-adds, "
                f"{stores} vector stores to the stack"
            )
            total += 1
    print(
        f"{total} innermost loops with stack stores among at least {args.min_arith} multiply-adds"
    )


if __name__ == "__main__":
    sys.exit(main())
