"""Prints the CMake arguments that locate the installed torch (and, for a CUDA build of torch,
the CUDA toolkit and the nvrtc library from the nvidia wheels, which its CMake config requires)."""
import glob
import os
import sysconfig

import torch

args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
if torch.version.cuda:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}")
    nvrtc = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "lib", "libnvrtc.so*")))
    nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
print(" ".join(args))
