"""Every public name is reachable as the README and the docs write it: `import kdkernels`, then
kdkernels.<sub>.<name>, with no further import."""
import re
from pathlib import Path

import pytest

import kdkernels

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_lazy_submodules_after_a_plain_import():
    assert kdkernels.cache.TeacherCache.__name__ == "TeacherCache"
    assert callable(kdkernels.echoatt.attention_similarity)
    assert callable(kdkernels.reference.topk_kl_div_ref)
    pytest.importorskip("transformers")
    assert kdkernels.integrations.hf.DistillationTrainer.__name__ == "DistillationTrainer"
    with pytest.raises(AttributeError, match="module 'kdkernels' has no attribute 'nope'"):
        kdkernels.nope  # noqa: B018


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_dotted_name_in_the_code_blocks_resolves(page):
    # `kdkernels.a.b(` / `kdkernels.a.B` in a page's code blocks (not torch.ops.kdkernels.*, the raw ops):
    # each attribute chain must exist as written.
    code = "\n".join(re.findall(r"```[\w-]*\n(.*?)```", page.read_text(), flags=re.S))
    chains = sorted(set(re.findall(r"(?<![\w.])kdkernels((?:\.[A-Za-z_]\w*)+)", code)))
    if page.name == "README.md":
        assert len(chains) >= 10, chains  # the parser still finds the README's examples
    for chain in chains:
        obj = kdkernels
        for part in chain.strip(".").split("."):
            if part == "hf":
                pytest.importorskip("transformers")
            assert hasattr(obj, part), f"{page.name}: kdkernels{chain}: {getattr(obj, '__name__', obj)!r} has no '{part}'"
            obj = getattr(obj, part)


def test_a_torch_other_than_the_build_one_is_refused_at_import():
    import subprocess
    import sys

    code = "import torch; torch.__version__ = '0.0.1'; import kdkernels"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"kdkernels: the native extension was built against torch \S+, but this process runs torch "
                     r"0\.0\.1\. Rebuild it in this environment", proc.stderr), proc.stderr[-1500:]
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**__import__("os").environ, "KDKERNELS_ALLOW_TORCH_MISMATCH": "1"})
    assert ok.returncode == 0, ok.stderr[-1500:]
