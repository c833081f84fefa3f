"""littlebird-ds: the LittleBird long-document encoder for DeepSpeed/Megatron-style training.

Importing the package registers LittleBird with transformers' ``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM``, ``AutoModelForQuestionAnswering``,
``AutoModelForSequenceClassification``, ``AutoModelForTokenClassification`` and
``AutoModelForMultipleChoice``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .config import LittleBirdConfig
from .model import (
    LittleBirdForMaskedLM,
    LittleBirdForMultipleChoice,
    LittleBirdForQuestionAnswering,
    LittleBirdForSequenceClassification,
    LittleBirdForTokenClassification,
    LittleBirdModel,
    LittleBirdModelOutput,
    LittleBirdPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("littlebird", LittleBirdConfig, exist_ok=True)
AutoModel.register(LittleBirdConfig, LittleBirdModel, exist_ok=True)
AutoModelForMaskedLM.register(LittleBirdConfig, LittleBirdForMaskedLM, exist_ok=True)
AutoModelForQuestionAnswering.register(LittleBirdConfig, LittleBirdForQuestionAnswering, exist_ok=True)
AutoModelForSequenceClassification.register(LittleBirdConfig, LittleBirdForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(LittleBirdConfig, LittleBirdForTokenClassification, exist_ok=True)
AutoModelForMultipleChoice.register(LittleBirdConfig, LittleBirdForMultipleChoice, exist_ok=True)

__all__ = [
    "LittleBirdConfig",
    "LittleBirdModel",
    "LittleBirdForMaskedLM",
    "LittleBirdForMultipleChoice",
    "LittleBirdForQuestionAnswering",
    "LittleBirdForSequenceClassification",
    "LittleBirdForTokenClassification",
    "LittleBirdModelOutput",
    "LittleBirdPreTrainedModel",
]
