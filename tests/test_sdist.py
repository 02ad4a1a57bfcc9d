"""The source distribution carries what a build needs: every file under csrc/ (the headers are only
#included, so without MANIFEST.in setuptools leaves them out and `pip install kdkernels-*.tar.gz` fails)."""
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_has_every_source_and_header(tmp_path):
    # egg_info in tmp_path: a stale kdkernels.egg-info/SOURCES.txt in the checkout would add files by itself
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                           str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tarball, = tmp_path.glob("kdkernels-*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
              if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert wanted and not wanted - names, sorted(wanted - names)[:10]
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "docs/topk_kl.md"} <= names
    assert not any(n.endswith(".so") for n in names)
