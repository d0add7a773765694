"""zerocore.zero: the ZeRO engine (stages 1, 2 and 3) built on flat, padded, per-unit buffers.

>>> from zerocore.zero import ZeroOptimizer, ZeroConfig
>>> ZeroConfig(stage=1).stage
1
"""
from .bindings import ParameterReplacedError
from .collectives import CollectiveError, CollectiveTimeout, PeerFailure
from .config import ZeroConfig
from .consistency import RankMismatchError
from .ds_config import DeepSpeedSettings, parse_deepspeed
from .init import ZeroInit, load_partitioned
from .optimizer import ZeroOptimizer, gathered_parameters

__all__ = ["ZeroOptimizer", "ZeroConfig", "CollectiveError", "CollectiveTimeout", "PeerFailure",
           "RankMismatchError", "ParameterReplacedError", "gathered_parameters", "ZeroInit", "load_partitioned", "parse_deepspeed", "DeepSpeedSettings"]
