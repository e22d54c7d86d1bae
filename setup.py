"""Build the spottune_ext C++/CUDA extension (spottune_ext._C).

Environment switches:
  FORCE_CUDA=1   build the CUDA kernels (fail if no matching toolkit is found)
  FORCE_CUDA=0   never build them
  (unset)        build them when a CUDA toolkit whose major version matches torch's is found
  TORCH_CUDA_ARCH_LIST  target architectures; defaults to "8.0;9.0" when no GPU is visible
"""
import glob
import os
import re
import subprocess
import sysconfig

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_version(cuda_home):
    # A toolkit is usable only with its headers: CUDA_HOME must be the toolkit root, not the
    # folder of an nvcc wrapper script.
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def want_cuda():
    force = os.environ.get("FORCE_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    found = nvcc_version(cuda_home)
    torch_cuda = torch.version.cuda
    matches = bool(found and torch_cuda and found.split(".")[0] == torch_cuda.split(".")[0])
    if force == "0":
        return False, found
    if force == "1":
        if not torch_cuda:
            raise RuntimeError("FORCE_CUDA=1 but this torch has no CUDA support (torch.version.cuda is None)")
        if not matches:
            raise RuntimeError(
                f"FORCE_CUDA=1 but no CUDA toolkit matching torch's CUDA {torch_cuda} was found at "
                f"CUDA_HOME={cuda_home} (nvcc {found}); set CUDA_HOME to the root of a matching toolkit")
        return True, found
    return matches, found


def nvidia_include_dirs():
    # ATen's CUDA headers include cusparse.h, cublas_v2.h, ...: with pip-installed torch these
    # live in the nvidia wheels, not in the toolkit next to nvcc.
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def write_build_info(with_cuda, nvcc):
    path = os.path.join(ROOT, "spottune_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py: what the compiled extension was built against.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


def make_extension():
    with_cuda, nvcc = want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}
        include_dirs = [os.path.join(ROOT, "csrc")] + nvidia_include_dirs()
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        include_dirs = [os.path.join(ROOT, "csrc")]
    print(f"spottune_ext build: torch {torch.__version__}, torch CUDA {torch.version.cuda}, "
          f"nvcc {nvcc} at {cpp_extension.CUDA_HOME}, CUDA kernels {'on' if with_cuda else 'off'}"
          + (f", arch {os.environ.get('TORCH_CUDA_ARCH_LIST')}" if with_cuda else ""))
    write_build_info(with_cuda, nvcc)
    return ext_cls(
        "spottune_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    name="spottune_ext",
    version="0.1.0",
    description="SpotTune adaptive fine-tuning with route-grouped execution",
    packages=find_packages(include=["spottune_ext", "spottune_ext.*"]),
    package_data={"spottune_ext": ["assets/*"]},
    entry_points={"console_scripts": ["spottune-train = spottune_ext.train:main"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
)
