"""Registration helpers shared by the ops in spottune_ext/ops/.

The C++ library declares every schema (csrc/spottune_ext.cpp). The Triton implementation of an
op is registered as a variant named "<op>_triton" whose schema is copied from the C++ one, so
each schema is written once; it is defined when the "triton" backend is first used
(spottune_ext.backends), so that the package imports without triton.
"""
import torch

_lib = torch.library.Library("spottune_ext", "FRAGMENT")


def op(name: str):
    return getattr(torch.ops.spottune_ext, name).default


def define_triton_variant(name: str, kernel) -> None:
    """Defines spottune_ext::<name>_triton with <name>'s schema, implemented by `kernel`."""
    schema = str(op(name)._schema).split("::", 1)[1]
    _lib.define(schema.replace(f"{name}(", f"{name}_triton(", 1), tags=(torch.Tag.pt2_compliant_tag,))
    for key in ("CPU", "CUDA"):
        _lib.impl(f"{name}_triton", kernel, key)


def register_fake(names, fn) -> None:
    for name in names:
        torch.library.register_fake(f"spottune_ext::{name}", fn)


def register_autograd(names, backward, setup_context) -> None:
    for name in names:
        torch.library.register_autograd(f"spottune_ext::{name}", backward, setup_context=setup_context)
