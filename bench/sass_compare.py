"""Compares the SASS of the kernels in two CUDA object files, kernel by kernel, on the CPU.

Why: a change meant to leave some kernels alone can still change their code (run 74: new fields
in NF4GemvArgs, unused by the v3 kernels, changed them by 300-500 instructions and cost 2-8%).
Compiling both versions here and comparing is free; a device run is not.

    nvcc -O3 --use_fast_math --expt-relaxed-constexpr -std=c++17 -arch=sm_90a -Icsrc \\
        -c csrc/nf4.cu -o /tmp/new.o          (and the same for the old source into /tmp/old.o)
    python bench/sass_compare.py /tmp/old.o /tmp/new.o ['v3_kernel<1, true' [OFF_VALUES]]

(quote NAME_SUBSTRING: kernel names hold '<', a shell redirect unquoted)

Prints, per kernel of the new object whose name contains NAME_SUBSTRING (default: all), its
instruction count, the old kernel's and whether the instruction text is identical, and how
many local-memory accesses (LDL / STL: spills) each has. A kernel of the new object whose
template arguments end in an added `, false>` (a new compile-time switch, off) is compared with
the old kernel without it; OFF_VALUES (comma-separated, default "false") names the values of
such an added last argument that mean "as before", e.g. "false,8" for a new WARPS argument whose
8 is the old kernel. Needs cuobjdump (on the PATH, or the one Triton ships).
"""
import glob
import os
import re
import shutil
import subprocess
import sys


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    pattern = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    hits = glob.glob(pattern)
    if not hits:
        sys.exit("cuobjdump not found (not on the PATH, not in Triton's nvidia backend)")
    return hits[0]


def kernels(obj: str) -> dict:
    """Demangled kernel name (without its parameter list) -> its instructions' text."""
    sass = subprocess.run([_cuobjdump(), "-sass", obj], capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for body in re.split(r"\n\s+Function : ", sass)[1:]:
        mangled = body.split("\n", 1)[0].strip()
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
        name = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", "")).replace("void ", "")
        out[name] = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,6}\*/\s+(.*?);", body)]
    return out


def main():
    old_obj, new_obj = sys.argv[1], sys.argv[2]
    want = sys.argv[3] if len(sys.argv) > 3 else ""
    off_values = set((sys.argv[4] if len(sys.argv) > 4 else "false").split(","))
    old, new = kernels(old_obj), kernels(new_obj)

    def spills(ins):
        return sum(1 for i in ins if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", i))

    for name in sorted(new):
        if want not in name:
            continue
        ins = new[name]
        old_name = name
        added = re.search(r", (\w+)>$", name)
        if name not in old and added and added.group(1) in off_values:
            old_name = name[:added.start()] + ">"
        if old_name in old:
            same = "identical" if old[old_name] == ins else "differs"
            print(f"{name}: {len(ins)} instructions ({spills(ins)} LDL/STL), old {len(old[old_name])}"
                  f" ({spills(old[old_name])}): {same}")
        else:
            print(f"{name}: {len(ins)} instructions ({spills(ins)} LDL/STL), not in the old object")


if __name__ == "__main__":
    main()
