"""rrd_kernels: fused kernels for Relational Representation Distillation (RRD) losses."""
from .backends import available_backends, backend_status
from .functional import rrd_loss
from .nn import RRDLoss
from .reference import rrd_reference

__all__ = ["rrd_loss", "RRDLoss", "rrd_reference", "available_backends", "backend_status"]
__version__ = "0.1.0"
