"""llama-dist: Llama-family inference, tensor-parallel on any backend (one process, NCCL, Gloo, MPI)."""
from .checkpoint.config import LoadConfig
from .distributed.context import ParallelContext, init_distributed
from .distributed.layout import ParallelConfig
from .generation.llama import Llama
from .kernels import Kernels
from .model.args import ModelArgs
from .model.transformer import Transformer

__all__ = ["Kernels", "Llama", "LoadConfig", "ModelArgs", "ParallelConfig", "ParallelContext", "Transformer",
           "init_distributed"]
__version__ = "0.1.0"
