"""lq_edu: the engine behind the lq-edu course.

Each module is one concept from the course, in the order the lessons meet it:

- ``paths``: where the kit keeps data and the course model
- ``device``: pick cuda > mps (opt-in) > cpu; memory and environment checks
- ``corpus``: the course corpus (Python 3.11 docs), loaded through ``datasets``
- ``models``: load the course model (or any local HF causal LM), count parameters
- ``evaluate``: held-out perplexity and greedy generation
- ``pretrain``: rebuild the course model's tokenizer and weights from the corpus
- ``profiles``: ci / laptop / gpu sizes for every lesson
- ``check``: self-checks that compare a learner's function with the engine's
- ``notebooks``: student copies, their sync check, and the headless course runner
- ``widgets``: sliders that degrade to printed tables in headless runs
- ``formats``: float formats bit by bit (fp32, bf16, fp16, fp8, fp4)        [lesson 01]
- ``memory``: bytes and bits per parameter for any format or HF config      [lesson 01]
- ``quant``: absmax/zero-point intN, NF-k codebooks, double quant, packing  [lessons 02-03]
- ``quant_linear``: QuantLinear, a frozen layer that dequantizes on the fly [lesson 04]
- ``surgery``: swap a model's linears for QuantLinear, atomically            [lesson 04]
- ``calibration``: calibration data, activation statistics, sequential GPTQ [lesson 05]
- ``gptq``: column-by-column quantization with Hessian error feedback       [lesson 05]
- ``awq``: activation-aware per-channel scales, folded into norms           [lesson 05]
- ``lowrank``: W = Q + L1 L2 (LQ-LoRA) and its LoftQ-style baseline         [lessons 05, 07]
- ``allocate``: mixed-precision bit allocation under a memory budget        [lesson 05]
- ``lora``: LoRALinear and LQLinear (zero / lq / lq-data starts)            [lessons 06-07]
- ``adapters``: inject adapters into any HF model; PEFT-format save and load [lessons 06-07]
- ``sft``: chat records to input ids with assistant-only labels; padding, packing
- ``tasks``: the seeded fine-tuning task of lessons 06-07 and its metrics
- ``trainer``: a compact accelerate loop: accumulation, checkpoints, resume, DDP
- ``finetune``: one run per (method, bits), retention against 16-bit LoRA    [lesson 07]
"""

from lq_edu import (
    adapters,
    allocate,
    awq,
    calibration,
    finetune,
    formats,
    gptq,
    lora,
    lowrank,
    memory,
    quant,
    sft,
    tasks,
    trainer,
)
from lq_edu.adapters import LoRAReport, inject_lora, load_adapter, save_adapter
from lq_edu.allocate import AllocationPlan, Candidate, allocate_bits
from lq_edu.calibration import calibrate_model, calibration_data, collect_stats
from lq_edu.check import CheckResult, check
from lq_edu.corpus import load_corpus
from lq_edu.device import environment_report, memory_info, pick_device
from lq_edu.evaluate import generate, perplexity
from lq_edu.gptq import gptq_quantize
from lq_edu.lora import LoRALinear, LQLinear
from lq_edu.lowrank import LQDecomposition, loftq_decompose, lq_decompose
from lq_edu.models import count_parameters, load_course_model, parameter_bytes, parameter_report
from lq_edu.paths import CORPUS_DIR, COURSE_MODEL_DIR, DATA_DIR
from lq_edu.profiles import PROFILES, Profile, get_profile
from lq_edu.quant import QuantizedWeight, dequantize, quantize
from lq_edu.quant_linear import QuantLinear
from lq_edu.surgery import SurgeryReport, quantize_model
from lq_edu.trainer import TrainConfig, train
from lq_edu.widgets import interact_or_table

__version__ = "0.1.0"

__all__ = [
    "TrainConfig",
    "sft",
    "tasks",
    "train",
    "trainer",
    "LoRALinear",
    "LoRAReport",
    "LQLinear",
    "adapters",
    "inject_lora",
    "load_adapter",
    "lora",
    "save_adapter",
    "AllocationPlan",
    "Candidate",
    "LQDecomposition",
    "allocate",
    "allocate_bits",
    "awq",
    "calibrate_model",
    "calibration",
    "finetune",
    "calibration_data",
    "collect_stats",
    "gptq",
    "gptq_quantize",
    "loftq_decompose",
    "lowrank",
    "lq_decompose",
    "COURSE_MODEL_DIR",
    "CORPUS_DIR",
    "DATA_DIR",
    "PROFILES",
    "QuantLinear",
    "QuantizedWeight",
    "SurgeryReport",
    "CheckResult",
    "Profile",
    "check",
    "count_parameters",
    "dequantize",
    "environment_report",
    "formats",
    "generate",
    "get_profile",
    "interact_or_table",
    "load_corpus",
    "load_course_model",
    "memory",
    "memory_info",
    "parameter_bytes",
    "parameter_report",
    "perplexity",
    "pick_device",
    "quant",
    "quantize",
    "quantize_model",
]
