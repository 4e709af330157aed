"""qtrain: 4- and 8-bit fully quantized training for JAX and Flax.

Pure functions quantize and dequantize tensors (`quantize`, `dequantize`,
`fake_quant`, `qtrain.numerics`); `dot_general` and `conv_general_dilated`
keep `jax.lax`'s signatures and run the forward and both backward GEMMs on
low-bit operands, each configured separately by a `DotConfig`.
`quantize_model` applies a `Recipe` (`qtrain.recipes`: baselines and one
per paper) to a Flax model; `qtrain.train` / `qtrain.compare` run it on the
tasks of `qtrain.tasks` (the `qtrain` command).
"""

from qtrain import attention as attention
from qtrain import batchnorm as batchnorm
from qtrain import bert as bert
from qtrain import bit_split as bit_split
from qtrain import checkpoint as checkpoint
from qtrain import compare as compare
from qtrain import data as data
from qtrain import formats as formats
from qtrain import fq_vit as fq_vit
from qtrain import hadamard as hadamard
from qtrain import linen_hooks as linen_hooks
from qtrain import lsq_linear as lsq_linear
from qtrain import models as models
from qtrain import numerics as numerics
from qtrain import optim as optim
from qtrain import pact as pact
from qtrain import ptq as ptq
from qtrain import nnx_hooks as nnx_hooks
from qtrain import presets as presets
from qtrain import prng as prng
from qtrain import recipes as recipes
from qtrain import rounding as rounding
from qtrain import scaling as scaling
from qtrain import statquant as statquant
from qtrain import tasks as tasks
from qtrain import train as train
from qtrain import variance as variance
from qtrain import vit as vit
from qtrain.config import REUSE as REUSE
from qtrain.config import DotConfig as DotConfig
from qtrain.config import GradientEstimator as GradientEstimator
from qtrain.config import MatmulConfig as MatmulConfig
from qtrain.config import TensorConfig as TensorConfig
from qtrain.dot import conv_general_dilated as conv_general_dilated
from qtrain.dot import dot_general as dot_general
from qtrain.einsum import einsum as einsum
from qtrain.formats import Format as Format
from qtrain.model import quantize_model as quantize_model
from qtrain.optim import quantize_state as quantize_state
from qtrain.optim import quantize_updates as quantize_updates
from qtrain.optim import scale_by_quantization_error as scale_by_quantization_error
from qtrain.optim import stochastic_round_params as stochastic_round_params
from qtrain.qarray import QArray as QArray
from qtrain.qarray import pack_int4 as pack_int4
from qtrain.qarray import unpack_int4 as unpack_int4
from qtrain.quantize import dequantize as dequantize
from qtrain.quantize import fake_quant as fake_quant
from qtrain.quantize import quantize as quantize
from qtrain.recipe import Recipe as Recipe
from qtrain.rules import QuantizationReport as QuantizationReport
from qtrain.rules import QuantRule as QuantRule
from qtrain.scaling import AbsMax as AbsMax
from qtrain.scaling import CustomCalibration as CustomCalibration
from qtrain.scaling import FixedScale as FixedScale
from qtrain.scaling import Lsq as Lsq
from qtrain.scaling import MinMax as MinMax
from qtrain.scaling import PerBlock as PerBlock
from qtrain.scaling import PerChannel as PerChannel
from qtrain.scaling import PerTensor as PerTensor
from qtrain.scaling import Sawb as Sawb

__version__ = '0.1.0'

__all__ = [
    'attention', 'batchnorm', 'checkpoint', 'compare', 'data', 'formats', 'linen_hooks', 'models',
    'nnx_hooks', 'numerics', 'optim', 'presets', 'prng', 'recipes', 'rounding', 'scaling', 'tasks',
    'train', 'bert', 'bit_split', 'hadamard', 'lsq_linear', 'fq_vit', 'pact', 'ptq', 'statquant', 'variance', 'vit',
    'GradientEstimator',
    'REUSE', 'DotConfig', 'MatmulConfig', 'TensorConfig', 'Format', 'QArray',
    'quantize', 'dequantize', 'fake_quant', 'dot_general', 'conv_general_dilated', 'einsum',
    'quantize_model',
    'pack_int4', 'unpack_int4', 'Recipe', 'QuantRule', 'QuantizationReport',
    'quantize_updates', 'stochastic_round_params', 'quantize_state', 'scale_by_quantization_error',
    'AbsMax', 'MinMax', 'Sawb', 'FixedScale', 'Lsq', 'CustomCalibration', 'PerTensor',
    'PerChannel', 'PerBlock',
    '__version__',
]
