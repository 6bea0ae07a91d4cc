"""llama-dist: Llama-family inference, tensor-parallel on any backend (one process, NCCL, Gloo, MPI)."""
from .distributed.context import ParallelContext, init_distributed
from .generation.llama import Llama
from .model.args import ModelArgs
from .model.transformer import Transformer

__all__ = ["Llama", "ModelArgs", "Transformer", "ParallelContext", "init_distributed"]
__version__ = "0.1.0"
