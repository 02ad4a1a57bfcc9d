"""Static report and budget check of the GPU kernels in kdkernels' built extension, via cuobjdump (no GPU needed)."""
import argparse
import datetime
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Spill budget per kernel instantiation, in bytes of local-memory stores + loads (see `Kernel.spill`).
# The default is 0: a new spill is a performance regression to look at, not noise. Overrides are
# (regex on the short kernel name, bytes); the first match wins. Record today's value of a kernel that
# legitimately spills, with the reason, rather than raising the default for everyone.
SPILL_BUDGET_DEFAULT = 0
# Today's offenders (CUDA 13.0, sm_80 + sm_90), each budget = its worst instantiation on either arch.
# All are small (<= 160 B static) and none is in a tensor-core kernel: mostly registers saved around
# CALLs to the compiler's out-of-line subroutines (64-bit integer division, division / sqrt slow paths);
# on sm_90 the Sinkhorn kernels also spill a few values at 64 registers without any CALL.
SPILL_BUDGET_OVERRIDES = [
    (r"^sinkhorn_fwd_kernel<", 160),         # <double, double, true, true> on sm_80
    (r"^sinkhorn_bwd_kernel<", 144),         # <double, double, false, false> on sm_90
    (r"^attention_similarity_kernel<", 160),  # sm_90 only (27 CALLs); 0 on sm_80
    (r"^attention_probs_fwd_kernel<", 24),   # <float, float> on sm_80
    (r"^trk::\w+_kernel<double,", 40),       # float64 FMA tiles; the tensor-core kernels stay at 0
]

# Kernels that must contain tensor-core MMAs (HMMA / HGMMA) on sm_80 and newer: (regex, reason). The
# WMMA paths are compiled only for __CUDA_ARCH__ >= 800, so older arches are not checked.
TENSOR_CORE_MIN_ARCH = 80
TENSOR_CORE_EXPECTED = [
    (r"^trk::(relation|contrastive)_(fwd|bwd)_kernel<(__half|__nv_bfloat16|float),",
     "token_relation.cuh: similarity tiles on mma.sync (m16n8k16 bf16/fp16, 3xTF32 m16n8k8 float32)"),
    (r"^trk::(relation|contrastive)_bwd_kernel<(__half|__nv_bfloat16|float),",
     "token_relation.cuh: gradient products G @ F on mma.sync m16n8k8 TF32 (accum_tile_mma)"),
    (r"^attention_(fwd|bwd|bwd_dq|probs|similarity)_mma_kernel<",
     "attention_mma.cuh: every product of the FlashAttention-2-style forward and backward (and of the "
     "materialised probabilities) on mma.sync m16n8k16"),
    (r"^tile_mma(_tf32)?_check_kernel",
     "tile_check.cuh: the mma.sync primitives of common/tile_mma.cuh (m16n8k16 bf16/fp16, m16n8k8 tf32)"),
]

# Kernels that must stage their operand tiles with cp.async (LDGSTS) on sm_80 and newer: (regex, reason).
CP_ASYNC_EXPECTED = [
    (r"^trk::(relation|contrastive)_(fwd|bwd)_kernel<(__half|__nv_bfloat16|float),",
     "token_relation.cuh: double-buffered operand chunks (stage_pair, accum_tile_mma)"),
    (r"^attention_(fwd|bwd|bwd_dq|probs|similarity)_mma_kernel<",
     "attention_mma.cuh: K/V (forward), Q/dO (backward), Q/K (probabilities) tiles"),
]

# Family of a kernel, by its short name (first match wins); rows are grouped by it.
FAMILIES = [("topk_kl", r"topk_kl"), ("sinkhorn", r"sinkhorn"), ("token_relation", r"^trk::"),
            ("attention", r"attention"), ("tile primitives (checks)", r"^tile_")]

# SASS mnemonics counted. HMMA/HGMMA (and the integer/double variants) are tensor-core MMAs; note that
# HFMA2.MMA is a plain half2 FMA issued on the MMA pipe, so only the mnemonic itself is matched.
TENSOR_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA")
COUNTED_OPS = TENSOR_OPS + ("LDGSTS", "LDSM", "STL", "LDL")


@dataclass
class Kernel:
    arch: int
    mangled: str
    name: str = ""  # demangled, shortened
    res: dict = field(default_factory=dict)  # cuobjdump resource usage: REG, STACK, SHARED, LOCAL, ...
    ops: dict = field(default_factory=dict)  # mnemonic -> static instruction count
    local_bytes: dict = field(default_factory=lambda: {"STL": 0, "LDL": 0})  # bytes moved by STL / LDL

    @property
    def spill(self):
        # Neither cuobjdump's resource usage nor the cubin's .nv.info records spills, so they are taken
        # from the SASS: bytes of the STL (store) + LDL (load) instructions. That is the static count
        # `ptxas -v` prints as spill stores / loads (identical for all 248 kernels of the first build
        # checked); a local array indexed at run time would also show up here, as stack bytes too.
        return self.local_bytes["STL"] + self.local_bytes["LDL"]

    @property
    def tensor_ops(self):
        return sum(self.ops.get(op, 0) for op in TENSOR_OPS)


def family(name):
    return next((fam for fam, rx in FAMILIES if re.search(rx, name)), "other")


# --- locating tools and the extension --------------------------------------------------------------

def find_cuobjdump():
    """triton's copy (torch depends on triton), else PATH, else the nvidia-cuda-cuobjdump wheel."""
    spec = importlib.util.find_spec("triton")  # locates the package without importing it (slow)
    candidates = []
    if spec and spec.submodule_search_locations:
        candidates += [os.path.join(d, "backends", "nvidia", "bin", "cuobjdump")
                       for d in spec.submodule_search_locations]
    candidates.append(shutil.which("cuobjdump"))
    for sp in sys.path:
        candidates += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin", "cuobjdump")))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit("cuobjdump not found: install torch's triton, the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`")


def find_so():
    hits = sorted(glob.glob(os.path.join(ROOT, "kdkernels", "_C*.so")), key=os.path.getmtime)
    if not hits:
        sys.exit(f"no kdkernels/_C*.so under {ROOT}: build it first (see docs/kernels.md) or pass --so")
    return hits[-1]  # the newest, should several Python versions' builds sit there


def toolkit_versions(so_path):
    """The CUDA compiler releases recorded in the cubins' .note.nv.tkinfo sections."""
    with open(so_path, "rb") as f:
        found = re.findall(rb"Cuda compilation tools, release [\d.]+, V[\d.]+", f.read())
    return sorted({v.decode() for v in found})


# --- parsing cuobjdump output -----------------------------------------------------------------------

_ARCH = re.compile(r"^arch = sm_(\d+)")
_FUNC_RES = re.compile(r"^\s*Function (\S+):\s*$")
_FUNC_SASS = re.compile(r"^\s*Function : (\S+)\s*$")
_INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9]*)(\S*)")


def _sections(text):
    """Yields (arch, line) for the lines of every ELF (cubin) section; PTX sections are skipped.

    `text` is a string or an iterable of lines (a pipe: the SASS of one build is ~200 MB of text)."""
    arch, elf = None, False
    for line in text.splitlines() if isinstance(text, str) else text:
        if line.startswith("Fatbin "):
            elf, arch = line.startswith("Fatbin elf"), None
            continue
        m = _ARCH.match(line)
        if m:
            arch = int(m.group(1))
        elif elf and arch is not None:
            yield arch, line


def parse_resource_usage(text):
    """`cuobjdump --dump-resource-usage` -> {(arch, mangled): {"REG": n, "STACK": n, ...}}."""
    out, cur = {}, None
    for arch, line in _sections(text):
        m = _FUNC_RES.match(line)
        if m:
            cur = out.setdefault((arch, m.group(1)), {})
        elif cur is not None and "REG:" in line:
            cur.update({k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
            cur = None
    return out


def _local_width(mods):
    """Bytes moved by one STL/LDL, from its modifiers: .64 / .128 / .U8 / .S16 ...; 32-bit by default."""
    for mod in mods.split("."):
        if mod in ("64", "128"):
            return int(mod) // 8
        if mod in ("U8", "S8", "U16", "S16"):
            return int(mod[1:]) // 8
    return 4


def parse_sass(text):
    """`cuobjdump -sass` -> {(arch, mangled): (op counts, {"STL": bytes, "LDL": bytes})}."""
    out, cur = {}, None
    for arch, line in _sections(text):
        m = _FUNC_SASS.match(line)
        if m:
            cur = out.setdefault((arch, m.group(1)), ({}, {"STL": 0, "LDL": 0}))
            continue
        m = _INSN.match(line) if cur is not None else None
        if m and m.group(1) in COUNTED_OPS:
            op, mods = m.groups()
            cur[0][op] = cur[0].get(op, 0) + 1
            if op in cur[1]:
                cur[1][op] += _local_width(mods)
    return out


def demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        lines = res.stdout.splitlines()
        if len(lines) == len(names):
            return lines
    except (OSError, subprocess.CalledProcessError):
        pass
    return list(names)  # no c++filt: the report still works, with mangled names


def shorten(demangled):
    """`void kdk::trk::f<__half, float, 0>(kdk::trk::P<__half, float>)` -> `trk::f<__half, float, 0>`."""
    name = demangled[5:] if demangled.startswith("void ") else demangled
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0:
            name = name[:i]
            break
    return name.replace("kdk::", "")


def collect(res, sass):
    """Kernels from parse_resource_usage's and parse_sass's results, demangled and shortened."""
    keys = sorted(set(res) | set(sass))
    kernels = [Kernel(arch, mangled) for arch, mangled in keys]
    for k, pretty in zip(kernels, demangle([k.mangled for k in kernels])):
        k.name = shorten(pretty)
        k.res = res.get((k.arch, k.mangled), {})
        if (k.arch, k.mangled) in sass:
            k.ops, k.local_bytes = sass[(k.arch, k.mangled)]
    return kernels


def scan(cuobjdump, so_path):
    """Runs cuobjdump twice and returns the kernels; the SASS is parsed as it streams in."""
    res = subprocess.run([cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True)
    if res.returncode:  # e.g. "does not contain device code": a CPU-only build
        sys.exit(f"{cuobjdump} failed on {so_path}: {res.stderr.strip() or res.returncode}")
    with subprocess.Popen([cuobjdump, "-sass", so_path], stdout=subprocess.PIPE, text=True) as proc:
        sass = parse_sass(proc.stdout)
    if proc.returncode:
        sys.exit(f"cuobjdump -sass {so_path} failed ({proc.returncode})")
    return collect(parse_resource_usage(res.stdout), sass)


# --- budgets ----------------------------------------------------------------------------------------

def check(kernels, archs=(), spill_default=None, spill_overrides=None, tc_expected=None, cp_expected=None):
    """Returns a list of human-readable problems (empty when everything is within budget)."""
    overrides = SPILL_BUDGET_OVERRIDES if spill_overrides is None else spill_overrides
    default = SPILL_BUDGET_DEFAULT if spill_default is None else spill_default
    expected = TENSOR_CORE_EXPECTED if tc_expected is None else tc_expected
    cp_expected = CP_ASYNC_EXPECTED if cp_expected is None else cp_expected
    problems = []
    present = {k.arch for k in kernels}
    for arch in archs:
        if arch not in present:
            problems.append(f"sm_{arch}: no cubin in the extension, though the build was asked for it")
    for k in kernels:
        budget = next((b for rx, b in overrides if re.search(rx, k.name)), default)
        if k.spill > budget:
            problems.append(f"sm_{k.arch} {k.name}: spills {k.spill} B (STL {k.local_bytes['STL']} + "
                            f"LDL {k.local_bytes['LDL']}) > budget {budget} B")
    for rx, reason in expected:
        hits = [k for k in kernels if k.arch >= TENSOR_CORE_MIN_ARCH and re.search(rx, k.name)]
        if not hits and any(a >= TENSOR_CORE_MIN_ARCH for a in present):
            problems.append(f"tensor-core expectation /{rx}/ matches no kernel (renamed?): {reason}")
        problems += [f"sm_{k.arch} {k.name}: no HMMA/HGMMA in its SASS, expected ({reason})"
                     for k in hits if k.tensor_ops == 0]
    for rx, reason in cp_expected:
        hits = [k for k in kernels if k.arch >= TENSOR_CORE_MIN_ARCH and re.search(rx, k.name)]
        if not hits and any(a >= TENSOR_CORE_MIN_ARCH for a in present):
            problems.append(f"cp.async expectation /{rx}/ matches no kernel (renamed?): {reason}")
        problems += [f"sm_{k.arch} {k.name}: no LDGSTS in its SASS, expected ({reason})"
                     for k in hits if not k.ops.get("LDGSTS")]
    return problems


# --- the report -------------------------------------------------------------------------------------

REGEN = ('TORCH_CUDA_ARCH_LIST="8.0;9.0" KDKERNELS_FORCE_CUDA=1 python setup.py build_ext --inplace\n'
         'python tools/kernel_report.py            # rewrites docs/kernels.md\n'
         'python tools/kernel_report.py --check --archs 80,90   # CI: budgets only, exit 1 on a violation')


# Shared memory per SM and the 1 KiB each block reserves, by architecture (CUDA C Programming Guide, compute
# capabilities 8.0 and 9.0); 64 warps per SM, 65536 registers.
SMEM_PER_SM = {80: 167936, 90: 233472}
SMEM_RESERVED = 1024
THREADS_MMA = 128  # every tensor-core kernel: 4 warps


def smem_table():
    """(kernel, head size, dynamic shared memory bytes) of the tensor-core launchers, from kdkernels._emu (the
    launchers' own size functions compiled for the host); [] when the emulator is not built."""
    sys.path.insert(0, ROOT)
    try:
        from kdkernels import _emu
    except ImportError:
        return []
    finally:
        sys.path.pop(0)
    table = getattr(_emu, "smem_table", None)  # an emulator built before the table existed: no section
    return [tuple(r) for r in table()] if table else []


def blocks_per_sm(arch, smem, regs, threads=THREADS_MMA):
    """Resident blocks per SM, the smaller of the shared-memory and register limits (and 64 warps)."""
    by_smem = SMEM_PER_SM[arch] // (smem + SMEM_RESERVED)
    by_regs = 65536 // (((regs + 7) // 8) * 8 * threads) if regs else 64
    return min(by_smem, by_regs, 64 * 32 // threads)


def occupancy_lines(kernels, table):
    """The markdown section: per tensor-core kernel and head size, bytes per block and blocks per SM."""
    if not table:
        return []
    archs = sorted(a for a in {k.arch for k in kernels} if a in SMEM_PER_SM)
    lines = ["", "## Dynamic shared memory and blocks per SM (tensor-core kernels)", "",
             "Bytes per block from the launchers' own size functions (`kdkernels._emu.smem_table()`); blocks "
             "per SM = min(shared memory per SM / (bytes + 1 KiB), 65536 registers / (registers x 128 threads), "
             "16), with the most registers any instantiation of the kernel uses on that arch. 0: the block does not fit "
             "that arch; the launcher then takes its fallback (gradient rows in global memory, fewer layers per "
             "launch, or the SIMT kernel).", "",
             "| kernel | head size | bytes / block | " + " | ".join(f"regs sm_{a} | blocks / SM sm_{a}" for a in archs)
             + " |", "|---|--:|--:|" + "--:|--:|" * len(archs)]
    for name, d, nbytes in table:
        base = name.split(" ")[0]
        cells = []
        for a in archs:
            if base.startswith("attention"):
                rx = re.escape(base) + rf"<[^>]*\b{d}\b"  # the instantiation of that head size
            else:
                rx = re.escape(base) + ("<(__half|__nv_bfloat16)," if "16-bit" in name else "<float,")
            regs = max((int(k.res.get("REG", 0)) for k in kernels if k.arch == a and re.search(rx, k.name)),
                       default=0)
            cells.append(f"{regs or '?'} | {blocks_per_sm(a, nbytes, regs)}")
        lines.append(f"| `{name}` | {d} | {nbytes} | " + " | ".join(cells) + " |")
    return lines


def render(kernels, toolkits, so_name):
    lines = [
        "# GPU kernels: registers, spills, shared memory, tensor-core use",
        "",
        "Generated by `tools/kernel_report.py` from the cubins inside the built extension "
        f"(`{so_name}`), with `cuobjdump --dump-resource-usage` and `cuobjdump -sass`: no GPU needed. "
        "One row per kernel instantiation, per architecture. Regenerate with:",
        "",
        "```sh", REGEN, "```",
        "",
        f"- Compiler: {', '.join(toolkits) or 'unknown'} (from the cubins' `.note.nv.tkinfo`).",
        f"- Generated: {datetime.date.today().isoformat()}.",
        "- **regs**: registers per thread. **spill st / ld**: bytes of the `STL` / `LDL` (local-memory "
        "store / load) instructions in the SASS. cuobjdump does not report spills; these static counts are "
        "what `ptxas -v` prints as spill stores / loads (identical for all 248 kernels when first checked "
        "against an `-Xptxas -v` build log), unless a "
        "kernel indexes a local array at run time, which would show here too. **stack**: stack frame bytes "
        "per thread. **smem**: static shared memory per block; on sm_90 the cubin counts the 1 KiB per-block "
        "system reservation in it. The kernels' dynamic shared memory is sized at launch: the last section "
        "lists it for the tensor-core kernels, with the blocks per SM it allows.",
        "- **MMA**: tensor-core instructions (`HMMA`, `HGMMA`; `HFMA2.MMA` is not one). **LDGSTS**: "
        "`cp.async` copies. **LDSM**: `ldmatrix` loads. All are static instruction counts in the SASS.",
        "- `--check` fails on a spill over budget, a tensor-core kernel without MMAs, or a missing arch; the "
        "budgets and expectations are at the top of the script.",
    ]
    for arch in sorted({k.arch for k in kernels}):
        lines += ["", f"## sm_{arch}", "",
                  summary(kernels, arch), "",
                  "| family | kernel | regs | spill st | spill ld | stack | smem | MMA | LDGSTS | LDSM |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        order = [fam for fam, _ in FAMILIES] + ["other"]
        rows = sorted((k for k in kernels if k.arch == arch), key=lambda k: (order.index(family(k.name)), k.name))
        prev = None
        for k in rows:
            fam = family(k.name)
            r = k.res
            lines.append(f"| {'**' + fam + '**' if fam != prev else ''} | `{k.name}` | {r.get('REG', '?')} | "
                         f"{k.local_bytes['STL']} | {k.local_bytes['LDL']} | {r.get('STACK', '?')} | "
                         f"{r.get('SHARED', '?')} | {k.tensor_ops} | {k.ops.get('LDGSTS', 0)} | "
                         f"{k.ops.get('LDSM', 0)} |")
            prev = fam
    lines += occupancy_lines(kernels, smem_table())
    return "\n".join(lines) + "\n"


def summary(kernels, arch):
    ks = [k for k in kernels if k.arch == arch]
    spills = [k.spill for k in ks if k.spill]
    regs = max(k.res.get("REG", 0) for k in ks)
    using = {what: sum(1 for k in ks if k.ops.get(op)) for what, op in (("cp.async", "LDGSTS"), ("ldmatrix", "LDSM"))}
    return (f"{len(ks)} kernel instantiations; registers per thread up to {regs}; {len(spills)} spill (up to "
            f"{max(spills, default=0)} B); {sum(1 for k in ks if k.tensor_ops)} use tensor cores, "
            f"{using['cp.async']} cp.async, {using['ldmatrix']} ldmatrix.")


def parse_archs(text):
    """`80,90`, `8.0;9.0+PTX` (a TORCH_CUDA_ARCH_LIST) -> [80, 90]."""
    return [int(a.replace("+PTX", "").replace(".", "")) for a in re.split(r"[,;\s]+", text) if a]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--so", help="the extension (default: the newest kdkernels/_C*.so)")
    ap.add_argument("--out", help="write the report here (default: docs/kernels.md, unless --check)")
    ap.add_argument("--check", action="store_true", help="check the budgets; exit 1 listing the offenders")
    ap.add_argument("--archs", default="", help="arches the build was asked for, e.g. 80,90: each needs a cubin")
    args = ap.parse_args(argv)

    so_path = os.path.abspath(args.so) if args.so else find_so()
    kernels = scan(find_cuobjdump(), so_path)
    if not kernels:
        sys.exit(f"{so_path}: no cubins (a CPU-only build?)")
    out = args.out or (None if args.check else os.path.join(ROOT, "docs", "kernels.md"))
    if out:
        with open(out, "w") as f:
            f.write(render(kernels, toolkit_versions(so_path), os.path.basename(so_path)))
        print(f"wrote {out}: {len(kernels)} kernel instantiations")
    if args.check:
        problems = check(kernels, parse_archs(args.archs))
        archs = ", ".join(f"sm_{a}" for a in sorted({k.arch for k in kernels}))
        if problems:
            print(f"kernel budget check FAILED ({len(problems)}):\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"kernel budget check passed: {len(kernels)} kernel instantiations ({archs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
