"""zerocore's standalone optimizers (drop-in torch.optim.Optimizer subclasses).

>>> from zerocore.optim import CPUAdam
>>> CPUAdam.__mro__[1].__name__
'Optimizer'
"""
from .cpu_adam import CPUAdam

__all__ = ["CPUAdam"]
from .fused_adam import FusedAdam  # noqa: E402

__all__ += ["FusedAdam"]
