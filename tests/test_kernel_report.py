"""tools/kernel_report.py: its cuobjdump parsers on canned real output and its budget checks (no GPU, no build)."""
import importlib.util
import os
import re
import shutil

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "kernel_report.py")
_spec = importlib.util.spec_from_file_location("kernel_report", _PATH)
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

REL_HALF = "_ZN3kdk3trk19relation_fwd_kernelI6__halffLi0EEEvNS0_9RelParamsIT_T0_EE"
SINK_DBL = "_ZN3kdk19sinkhorn_fwd_kernelIddLb1ELb1EEEvNS_14SinkhornParamsIT_T0_EE"

# Lines copied from `cuobjdump --dump-resource-usage` of a CUDA 13.0 sm_80 + sm_90 build (trimmed).
RESOURCE_USAGE = f"""
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /tmp/kr/csrc/cuda/token_relation.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function {REL_HALF}:
  REG:80 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {SINK_DBL}:
  REG:64 STACK:32 SHARED:0 LOCAL:0 CONSTANT[2]:168 CONSTANT[0]:520 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /tmp/kr/csrc/cuda/token_relation.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function {REL_HALF}:
  REG:72 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:632 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# Lines copied from `cuobjdump -sass` of the same build (trimmed), plus a PTX section, which is skipped.
SASS = f"""
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /tmp/kr/csrc/cuda/sinkhorn.cu

\tcode for sm_80
\t.target\tsm_80

\t\tFunction : {SINK_DBL}
\t.headerflags\t@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0120*/                   STL.64 [R1+0x18], R8 ;                                             /* 0x0000180801007387 */
                                                                                                      /* 0x000fe20000000800 */
        /*01a0*/                   STL [R1+0xc], R4 ;                                                 /* 0x00000c0401007387 */
        /*02f0*/                   LDL R19, [R1+0x10] ;                                               /* 0x0000100001137983 */
        /*09b0*/                   LDL.64 R16, [R1] ;                                                  /* 0x0000000001107983 */
        /*0500*/                   @UP0 UIADD3 UR5, UR5, -UR13, URZ ;                               /* 0x8000000d05050290 */
\t\t..........

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /tmp/kr/csrc/cuda/token_relation.cu

\tcode for sm_90
\t.target\tsm_90

\t\tFunction : {REL_HALF}
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                             /* 0x00000a00ff017b82 */
        /*0050*/              @!P0 BRA 0x170 ;                                                        /* 0x0000000000448947 */
        /*0530*/                   HFMA2.MMA R9, -RZ, RZ, 0, 0 ;                                      /* 0x00000000ff097435 */
        /*45e0*/                   LDSM.16.M88.4 R48, [R48] ;                                         /* 0x000000003030783b */
        /*4630*/                   HMMA.16816.F32 R12, R4, R48.reuse, R12 ;                           /* 0x00000030040c723c */
        /*4640*/                   HMMA.16816.F32 R36, R52.reuse, R48, R36 ;                          /* 0x000000303424723c */
        /*6ee0*/                   HMMA.1684.F32.TF32 R32, R40.reuse, R37, RZ ;                       /* 0x000000252820723c */
\t\t..........

Fatbin ptx code:
================
arch = sm_90
\t\tFunction : ptx_section_must_be_ignored
        /*0000*/                   HMMA.16816.F32 R0, R0, R0, R0 ;
"""


def test_parse_resource_usage():
    res = kr.parse_resource_usage(RESOURCE_USAGE)
    assert set(res) == {(80, REL_HALF), (80, SINK_DBL), (90, REL_HALF)}
    assert res[(80, SINK_DBL)]["REG"] == 64 and res[(80, SINK_DBL)]["STACK"] == 32
    assert res[(90, REL_HALF)]["SHARED"] == 1024 and res[(90, REL_HALF)]["CONSTANT[0]"] == 632


def test_parse_sass_counts_instructions_and_local_bytes():
    sass = kr.parse_sass(SASS)
    assert set(sass) == {(80, SINK_DBL), (90, REL_HALF)}
    ops, local = sass[(80, SINK_DBL)]
    assert local == {"STL": 8 + 4, "LDL": 4 + 8}
    assert ops == {"STL": 2, "LDL": 2}
    ops, local = sass[(90, REL_HALF)]
    assert ops == {"HMMA": 3, "LDSM": 1}  # HFMA2.MMA is an FMA, not a tensor-core op
    assert local == {"STL": 0, "LDL": 0}
    # Parsing a stream of lines (as from a pipe) gives the same result.
    assert kr.parse_sass(iter(SASS.splitlines(keepends=True))) == sass


def test_local_width():
    assert [kr._local_width(m) for m in ("", ".64", ".LU.64", ".128", ".U8", ".S16")] == [4, 8, 8, 16, 1, 2]


def test_shorten():
    assert kr.shorten("void kdk::trk::relation_fwd_kernel<__half, float, 0>(kdk::trk::RelParams<__half, float>)") \
        == "trk::relation_fwd_kernel<__half, float, 0>"
    assert kr.shorten("void kdk::sinkhorn_pair_cost_kernel<float>(float const*, float const*, long, int)") \
        == "sinkhorn_pair_cost_kernel<float>"
    assert kr.shorten("void kdk::f<(kdk::Mode)1>(int)") == "f<(Mode)1>"  # '(' inside <> is kept


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt")
def test_collect_demangles_and_merges():
    ks = kr.collect(kr.parse_resource_usage(RESOURCE_USAGE), kr.parse_sass(SASS))
    by = {(k.arch, k.name): k for k in ks}
    rel, sink = "trk::relation_fwd_kernel<__half, float, 0>", "sinkhorn_fwd_kernel<double, double, true, true>"
    assert set(by) == {(80, rel), (90, rel), (80, sink)}
    k = by[(80, sink)]
    assert (k.res["REG"], k.spill, kr.family(k.name)) == (64, 24, "sinkhorn")
    k = by[(90, rel)]
    assert (k.res["REG"], k.tensor_ops, kr.family(k.name)) == (72, 3, "token_relation")
    assert by[(80, rel)].tensor_ops == 0  # its SASS is not in the snippet
    md = kr.render(ks, ["Cuda compilation tools, release 13.0, V13.0.88"], "_C.so")
    assert "## sm_80" in md and "## sm_90" in md
    assert f"| **sinkhorn** | `{sink}` | 64 | 12 | 12 | 32 | 0 | 0 | 0 | 0 |" in md


def K(arch, name, spill=0, mma=0):
    return kr.Kernel(arch, "_Z" + name, name=name, res={"REG": 32}, ops={"HMMA": mma} if mma else {},
                     local_bytes={"STL": spill // 2, "LDL": spill - spill // 2})


TC = [(r"^trk::\w+_kernel<(__half|__nv_bfloat16),", "WMMA")]


def test_check_flags_spills_over_budget():
    ks = [K(90, "topk_kl_fwd_kernel<float, float, int>", spill=48),
          K(90, "sinkhorn_fwd_kernel<float, float, true, true>", spill=96),
          K(90, "sinkhorn_bwd_kernel<float, float, true, true>", spill=200)]
    problems = kr.check(ks, spill_default=0, spill_overrides=[(r"^sinkhorn_", 160)], tc_expected=[],
                        cp_expected=[])
    assert len(problems) == 2
    assert "topk_kl_fwd_kernel" in problems[0] and "48 B" in problems[0] and "budget 0 B" in problems[0]
    assert "sinkhorn_bwd_kernel" in problems[1] and "budget 160 B" in problems[1]
    assert kr.check(ks[1:2], spill_default=0, spill_overrides=[(r"^sinkhorn_", 160)], tc_expected=[],
                    cp_expected=[]) == []


def test_check_flags_missing_tensor_cores():
    ks = [K(90, "trk::relation_fwd_kernel<__half, float, 0>", mma=32),
          K(90, "trk::relation_bwd_kernel<__nv_bfloat16, float, 0, true>"),  # lost its HMMAs
          K(90, "trk::relation_fwd_kernel<float, float, 0>"),  # FMA path: not expected to use tensor cores
          K(75, "trk::relation_fwd_kernel<__half, float, 0>")]  # below sm_80: WMMA path not compiled
    problems = kr.check(ks, spill_default=0, spill_overrides=[], tc_expected=TC, cp_expected=[])
    assert len(problems) == 1
    assert "sm_90 trk::relation_bwd_kernel<__nv_bfloat16" in problems[0] and "no HMMA" in problems[0]
    # An expectation that matches nothing (a renamed kernel) is reported rather than silently passing.
    problems = kr.check(ks[2:], spill_default=0, spill_overrides=[], tc_expected=TC, cp_expected=[])
    assert len(problems) == 1 and "matches no kernel" in problems[0]


def test_check_flags_missing_cp_async():
    ks = [kr.Kernel(90, "_Za", name="trk::relation_fwd_kernel<__half, float, 0>", res={"REG": 32},
                    ops={"HMMA": 8, "LDGSTS": 4}, local_bytes={"STL": 0, "LDL": 0}),
          K(90, "trk::relation_bwd_kernel<__half, float, 0, true>", mma=8)]  # lost its cp.async
    cp = [(r"^trk::\w+_kernel<__half,", "cp.async staging")]
    problems = kr.check(ks, spill_default=0, spill_overrides=[], tc_expected=[], cp_expected=cp)
    assert len(problems) == 1 and "relation_bwd_kernel" in problems[0] and "no LDGSTS" in problems[0]


def test_check_flags_missing_arch():
    ks = [K(90, "topk_kl_fwd_kernel<float, float, int>")]
    assert kr.check(ks, archs=[90], spill_default=0, spill_overrides=[], tc_expected=[], cp_expected=[]) == []
    problems = kr.check(ks, archs=kr.parse_archs("8.0;9.0+PTX"), spill_default=0, spill_overrides=[],
                        tc_expected=[], cp_expected=[])
    assert problems == ["sm_80: no cubin in the extension, though the build was asked for it"]


def test_blocks_per_sm():
    # 87 KB forward tiles at D = 128: two blocks on an sm_90 SM, one on sm_80; registers can be the limit
    assert kr.blocks_per_sm(90, 87040, 168) == 2 and kr.blocks_per_sm(80, 87040, 168) == 1
    assert kr.blocks_per_sm(90, 8192, 255) == 2  # 256 registers x 128 threads: two blocks of 65536
    assert kr.blocks_per_sm(90, 1024, 32) == 16  # 64 warps per SM


def test_parse_archs():
    assert kr.parse_archs("80,90") == [80, 90]
    assert kr.parse_archs("8.0;9.0+PTX") == [80, 90]
    assert kr.parse_archs("") == []


def test_shipped_expectations_match_the_tensor_core_instantiations():
    # The script's own regexes: every 16-bit and float32 token-relation kernel and every *_mma_kernel is
    # expected to use tensor cores and cp.async; float64 and the SIMT attention kernels are not.
    def expected(name, table=kr.TENSOR_CORE_EXPECTED):
        return [reason for rx, reason in table if re.search(rx, name)]

    for name in ("trk::relation_fwd_kernel<__half, float, 1>", "trk::contrastive_fwd_kernel<__nv_bfloat16, float>",
                 "trk::relation_fwd_kernel<float, float, 0>"):
        assert len(expected(name)) == 1 and len(expected(name, kr.CP_ASYNC_EXPECTED)) == 1
    for name in ("trk::relation_bwd_kernel<__half, float, 0, true>",
                 "trk::contrastive_bwd_kernel<__nv_bfloat16, float, false>",
                 "trk::contrastive_bwd_kernel<float, float, true>"):
        assert len(expected(name)) == 2  # similarity tiles and TF32 gradient products
    for name in ("attention_bwd_mma_kernel<c10::Half, false, 64, true, true>",):
        assert len(expected(name)) == 1 and len(expected(name, kr.CP_ASYNC_EXPECTED)) == 1
    for name in ("trk::contrastive_bwd_kernel<double, double, true>",
                 "attention_fwd_kernel<c10::Half, float, 64, false>",
                 "sinkhorn_fwd_kernel<c10::BFloat16, float, true, true>"):
        assert expected(name) == [] and expected(name, kr.CP_ASYNC_EXPECTED) == []
