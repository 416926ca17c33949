"""Low-precision training emulation: FP8, MXFP8 and NVFP4 formats and quantised matmuls."""
from nemotron_jax.quant.dot import RECIPES, Recipe, get_recipe, qdot, qragged_dot
from nemotron_jax.quant.formats import (FORMATS, Quantized, quant_stats, quantize,
                                        quantize_dequantize)
from nemotron_jax.quant.hadamard import random_hadamard_transform, rht_matrix
