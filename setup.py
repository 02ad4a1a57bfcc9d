"""Builds kdkernels._C: a CUDAExtension when a CUDA toolkit is found, a CppExtension otherwise."""
import glob
import os
import shutil
import site
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """The toolkit dir holding bin/nvcc, include/cuda_runtime.h and lib64/libcudart.so.

    torch derives CUDA_HOME from `nvcc` on PATH; where that `nvcc` is a wrapper script (as on our CI
    machines) torch lands in a directory without libcudart, so we resolve the real one ourselves.
    """
    def ok(d):
        return d and all(os.path.exists(os.path.join(d, p))
                         for p in ("bin/nvcc", "include/cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script that execs the real nvcc: read the path it names
            with open(nvcc, "r", errors="ignore") as f:
                for tok in f.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for d in candidates:
        if ok(d):
            return os.path.realpath(d)
    return None


FORCE_CPU = os.environ.get("KDKERNELS_FORCE_CPU", "0") == "1"
FORCE_CUDA = os.environ.get("KDKERNELS_FORCE_CUDA", "0") == "1"
CUDA_HOME = None if FORCE_CPU else _real_cuda_home()
if CUDA_HOME:
    # Must happen before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = CUDA_HOME
elif FORCE_CUDA:
    sys.exit("KDKERNELS_FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) was found; "
             "set CUDA_HOME")
# sm_80 code also runs on 8.6/8.9 and the 9.0 PTX is JIT-compiled on newer GPUs, so two targets cover
# Ampere, Ada, Hopper and later while keeping the build short.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = CUDA_HOME is not None and torch.version.cuda is not None
if FORCE_CUDA and not WITH_CUDA:
    sys.exit(f"KDKERNELS_FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")


def _nvidia_include_dirs():
    """cublas_v2.h / cusparse.h (pulled in by ATen/cuda headers) may live only in torch's nvidia wheels."""
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(sp, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
        dirs += [d for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
                 if os.path.exists(os.path.join(d, "cublas_v2.h")) and d not in dirs]
    return dirs


def _arch_list():
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "")


cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
# No -std flag: torch's cpp_extension picks the standard its headers need (C++17 for 2.4, C++20 for newer).
# -fopenmp: at::parallel_for is header code that only runs threads when this TU is built with OpenMP
# (torch's own CPU build uses it); without the flag every CPU op would silently run on one thread.
cxx_flags = ["-O3", "-fopenmp"]
link_flags = ["-fopenmp"]
macros = [("KDK_ARCH_LIST", f'"{_arch_list() if WITH_CUDA else ""}"'),
          ("KDK_TORCH_VERSION", f'"{torch.__version__}"')]
include_dirs = [os.path.join(ROOT, "csrc")]
if WITH_CUDA:
    macros.append(("KDK_WITH_CUDA", None))
    include_dirs += _nvidia_include_dirs()
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                  f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    ext = CUDAExtension("kdkernels._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                        define_macros=macros,
                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
else:
    ext = CppExtension("kdkernels._C", cpu_sources, include_dirs=include_dirs, define_macros=macros,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

ext_modules = [ext]

# kdkernels._emu: the CUDA launchers and kernels compiled with the host compiler against the emulator in
# csrc/emu (built when KDKERNELS_EMU=1; the test suite's `emu` marker runs the CUDA test cases on it).
# -fsanitize=kernel-address in call mode makes every load and store call the emulator's checks; no
# sanitizer runtime is linked. -Dkdk=... keeps its symbols apart from kdkernels._C's.
def _emu_supported():
    """The emulator switches fibers with x86-64 assembly and needs GCC's kernel-address instrumentation."""
    import platform
    import sysconfig
    cc = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        version = subprocess.run([cc.split()[0], "--version"], capture_output=True, text=True).stdout.lower()
    except OSError:
        return False
    return platform.machine() in ("x86_64", "AMD64") and "clang" not in version and (
        "gcc" in version or "free software foundation" in version)


if os.environ.get("KDKERNELS_EMU", "0") == "1" and not _emu_supported():
    print("kdkernels: KDKERNELS_EMU=1 ignored: the CUDA emulator needs x86-64 and GCC; building without it",
          file=sys.stderr)
elif os.environ.get("KDKERNELS_EMU", "0") == "1":
    emu_flags = ["-O2", "-DKDK_EMU", "-Dkdk=kdk_on_emu", "-fsanitize=kernel-address",
                 "--param=asan-instrumentation-with-call-threshold=0", "--param=asan-stack=0",
                 "--param=asan-globals=0", "-fno-sanitize-address-use-after-scope", "-fno-omit-frame-pointer"]
    emu_sources = sorted(glob.glob("csrc/emu/*.cpp") + glob.glob("csrc/common/*.cpp"))
    ext_modules.append(CppExtension("kdkernels._emu", emu_sources,
                                    include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "emu", "include")],
                                    define_macros=[("KDK_TORCH_VERSION", f'"{torch.__version__}"')],
                                    extra_compile_args={"cxx": emu_flags}))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
