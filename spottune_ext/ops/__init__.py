"""The Python layer of each op: input checks, backend choice, fake and autograd registration."""
from .gumbel_st import gumbel_st, gumbel_st_impl

__all__ = ["gumbel_st", "gumbel_st_impl"]
