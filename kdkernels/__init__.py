"""kdkernels: fused CUDA/C++ kernels for knowledge distillation, as drop-in PyTorch losses."""
__version__ = "0.1.0"

import torch  # noqa: F401,E402  (loads libtorch/libc10, which _C links against)

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.kdkernels.* ops)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "kdkernels: the native extension kdkernels._C failed to load "
        f"({e}). It is built against one torch version: reinstall from the source tree with "
        "`pip install --no-build-isolation -e .` in this environment (torch must already be installed)."
    ) from e

import os as _os  # noqa: E402

# The extension is compiled against one torch's C++ ABI; with another torch it may load and then misbehave.
if _C.torch_version() != torch.__version__ and _os.environ.get("KDKERNELS_ALLOW_TORCH_MISMATCH") != "1":
    raise ImportError(
        f"kdkernels: the native extension was built against torch {_C.torch_version()}, but this process runs "
        f"torch {torch.__version__}. Rebuild it in this environment: `pip install --no-build-isolation -e .` "
        "(or reinstall the wheel built for this torch); KDKERNELS_ALLOW_TORCH_MISMATCH=1 skips this check."
    )

from . import _meta  # noqa: F401,E402  (fake kernels for torch.compile)
from .functional import teacher_topk, topk_kl_div  # noqa: E402
from .losses import TopKKLDivLoss  # noqa: E402
from .functional import sinkhorn, sinkhorn_kd_loss  # noqa: E402
from .losses import SinkhornKDLoss  # noqa: E402
from .distill import DistillationLoss, TeacherTargets  # noqa: E402
from .functional import sample_tokens, token_contrastive_loss, token_relation_loss  # noqa: E402
from .losses import TokenContrastiveLoss, TokenRelationLoss  # noqa: E402


def build_info() -> dict:
    """How the extension was built and what this process can run."""
    import torch

    info = {
        "kdkernels": __version__,
        "compiled_with_cuda": _C.compiled_with_cuda(),
        "cuda_version_built": _C.cuda_version() or None,
        "cuda_arch_list": _C.cuda_arch_list() or None,
        "torch_built": _C.torch_version(),
        "torch_runtime": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_threads": torch.get_num_threads(),
    }
    return info


__all__ = ["topk_kl_div", "teacher_topk", "TopKKLDivLoss", "build_info", "__version__"]
__all__ += ["sinkhorn", "sinkhorn_kd_loss", "SinkhornKDLoss"]
__all__ += ["DistillationLoss", "TeacherTargets"]
__all__ += ["token_relation_loss", "token_contrastive_loss", "TokenRelationLoss", "TokenContrastiveLoss",
            "sample_tokens"]

from .linear import LinearDistillLoss, LinearTopKKLDivLoss, linear_distill_loss, linear_teacher_topk  # noqa: E402
from .linear import linear_topk_kl_div  # noqa: E402
from .parallel import vocab_parallel_linear_topk_kl_div, vocab_parallel_topk_kl_div  # noqa: E402

__all__ += ["linear_topk_kl_div", "linear_distill_loss", "linear_teacher_topk", "LinearTopKKLDivLoss",
            "LinearDistillLoss", "vocab_parallel_topk_kl_div", "vocab_parallel_linear_topk_kl_div"]

from .functional import SharedAttentionGroup, attention, shared_attention, shared_attention_probs  # noqa: E402
from . import echoatt  # noqa: E402,F401  (kdkernels.echoatt: layer similarity, groups, EchoAttention, conversion)

__all__ += ["attention", "shared_attention", "shared_attention_probs", "SharedAttentionGroup", "echoatt"]


# Submodules reachable as attributes, imported on first use (`kdkernels.cache.TeacherCache(...)` after a plain
# `import kdkernels`), so `import kdkernels` stays light.
_LAZY_SUBMODULES = ("cache", "integrations", "reference", "demo")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kdkernels' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
