"""What a network costs: analytic models differentiable in the widths, and independent counters."""

from .model import ResourceModel, count_flops, count_params

__all__ = ["ResourceModel", "count_flops", "count_params"]
