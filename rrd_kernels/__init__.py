"""rrd_kernels: fused kernels for Relational Representation Distillation (RRD) losses."""
from .backends import available_backends, backend_status
from .functional import rrd_loss
from .gathered import gathered_reference, gathered_rrd_rows
from .momentum import RRDMomentumLoss
from .nn import RRDLoss
from .reference import rrd_reference
from .shard_bank import merge_bank_shards
from .sharded_momentum import reshard_memory_state

__all__ = ["rrd_loss", "RRDLoss", "RRDMomentumLoss", "gathered_rrd_rows", "gathered_reference", "rrd_reference", "available_backends", "backend_status", "merge_bank_shards", "reshard_memory_state"]
__version__ = "0.1.0"
