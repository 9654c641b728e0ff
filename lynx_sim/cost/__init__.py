"""GPU cost model: hardware descriptions and the roofline of a decode step."""

from .hardware import HardwareSpec
from .parallel import Parallel
from .roofline import Roofline, StepCost

__all__ = ["HardwareSpec", "Parallel", "Roofline", "StepCost"]
