"""The Python layer of each op: input checks, backend choice, fake and autograd registration."""
from .combine_rows import combine_rows
from .gather_rows import gather_rows
from .gumbel_st import gumbel_st, gumbel_st_impl
from .route_plan import RoutePlan, route_plan

__all__ = ["gumbel_st", "gumbel_st_impl", "route_plan", "RoutePlan", "gather_rows", "combine_rows"]
