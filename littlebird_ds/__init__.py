"""littlebird-ds: the LittleBird long-document encoder for DeepSpeed/Megatron-style training.

Importing the package registers LittleBird with transformers' ``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM`` and ``AutoModelForQuestionAnswering``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering

from .config import LittleBirdConfig
from .model import (
    LittleBirdForMaskedLM,
    LittleBirdForQuestionAnswering,
    LittleBirdModel,
    LittleBirdModelOutput,
    LittleBirdPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("littlebird", LittleBirdConfig, exist_ok=True)
AutoModel.register(LittleBirdConfig, LittleBirdModel, exist_ok=True)
AutoModelForMaskedLM.register(LittleBirdConfig, LittleBirdForMaskedLM, exist_ok=True)
AutoModelForQuestionAnswering.register(LittleBirdConfig, LittleBirdForQuestionAnswering, exist_ok=True)

__all__ = [
    "LittleBirdConfig",
    "LittleBirdModel",
    "LittleBirdForMaskedLM",
    "LittleBirdForQuestionAnswering",
    "LittleBirdModelOutput",
    "LittleBirdPreTrainedModel",
]
