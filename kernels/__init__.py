"""Reference quantization kernels in numpy: FP8 (E4M3/E5M2), INT8, group-wise INT4 and GPTQ."""

from .fp8 import FP8_FORMATS, Fp8Format, Fp8Tensor, expand_block_scale, fake_quant_fp8, quantize_fp8
from .gptq import gptq_quantize_int4
from .int4 import Int4Tensor, OnnxInt4, int4_codes, int4_grid, quantize_int4, to_matmulnbits, to_onnx_int4
from .int8 import Int8Tensor, quantize_int8

__all__ = [
    "FP8_FORMATS",
    "Fp8Format",
    "Fp8Tensor",
    "Int4Tensor",
    "Int8Tensor",
    "OnnxInt4",
    "expand_block_scale",
    "fake_quant_fp8",
    "gptq_quantize_int4",
    "int4_codes",
    "int4_grid",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "to_matmulnbits",
    "to_onnx_int4",
]
