"""setup.py's CUDA toolkit choice says why the CUDA kernels are off, and its generated build facts go
under build/ (run on a copy of setup.py: nothing is compiled)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp_path, **env):
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "FORCE_CUDA")} | env
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.version.cuda is None, reason="a torch without CUDA never looks for a toolkit")
def test_a_wrapper_folder_is_not_a_toolkit_and_the_build_says_so(tmp_path):
    wrapper = tmp_path / "wrapper"
    (wrapper / "bin").mkdir(parents=True)
    (wrapper / "bin" / "nvcc").write_text("#!/bin/sh\nexec nvcc \"$@\"\n")
    result = _setup(tmp_path, CUDA_HOME=str(wrapper))
    assert result.returncode == 0, result.stderr
    assert f"CUDA kernels off: {wrapper} is not a CUDA toolkit root (no include/cuda_runtime.h" in result.stdout
    forced = _setup(tmp_path, CUDA_HOME=str(wrapper), FORCE_CUDA="1")
    assert forced.returncode != 0 and "FORCE_CUDA=1 but no CUDA toolkit matching" in forced.stderr


@pytest.mark.skipif(torch.version.cuda is None or not Path("/usr/local/cuda/include/cuda_runtime.h").exists(),
                    reason="needs a torch with CUDA and a toolkit at /usr/local/cuda")
def test_an_nvcc_wrapper_on_the_path_does_not_hide_the_toolkit(tmp_path):
    wrapper = tmp_path / "wrapper"
    (wrapper / "bin").mkdir(parents=True)
    (wrapper / "bin" / "nvcc").write_text("#!/bin/sh\nexec /usr/local/cuda/bin/nvcc \"$@\"\n")
    (wrapper / "bin" / "nvcc").chmod(0o755)
    result = _setup(tmp_path, PATH=f"{wrapper / 'bin'}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert "at /usr/local/cuda" in result.stdout and ("CUDA kernels on" in result.stdout
                                                      or "torch was built with CUDA" in result.stdout)


def test_build_facts_are_generated_under_build(tmp_path):
    result = _setup(tmp_path, FORCE_CUDA="0")
    assert result.returncode == 0 and "CUDA kernels off: FORCE_CUDA=0" in result.stdout
    header = (tmp_path / "build" / "generated" / "spottune_build_info.h").read_text()
    assert f'#define SPOTTUNE_TORCH_VERSION "{torch.__version__}"' in header
    assert '#define SPOTTUNE_CUDA_VERSION ""' in header
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "setup.py"]
