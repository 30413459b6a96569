"""rrd_kernels: fused kernels for Relational Representation Distillation (RRD) losses."""
from .backends import available_backends, backend_status
from .functional import rrd_loss
from .nn import RRDLoss
from .reference import rrd_reference
from .shard_bank import merge_bank_shards

__all__ = ["rrd_loss", "RRDLoss", "rrd_reference", "available_backends", "backend_status", "merge_bank_shards"]
__version__ = "0.1.0"
