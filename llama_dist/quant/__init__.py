"""Weight-only quantization: int8 per output channel, int4 group-wise; kernels chosen per device."""
from .weights import QUANT_TYPES, Int4Weight, Int8Weight, QuantizedWeight, quantize_weight

__all__ = ["QUANT_TYPES", "Int4Weight", "Int8Weight", "QuantizedWeight", "quantize_weight"]
