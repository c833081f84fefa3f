from .modeling import (
    LittleBirdForMaskedLM,
    LittleBirdForQuestionAnswering,
    LittleBirdModel,
    LittleBirdModelOutput,
    LittleBirdPreTrainedModel,
)
from .task_heads import (
    LittleBirdForMultipleChoice,
    LittleBirdForSequenceClassification,
    LittleBirdForTokenClassification,
)

__all__ = [
    "LittleBirdForMaskedLM",
    "LittleBirdForMultipleChoice",
    "LittleBirdForQuestionAnswering",
    "LittleBirdForSequenceClassification",
    "LittleBirdForTokenClassification",
    "LittleBirdModel",
    "LittleBirdModelOutput",
    "LittleBirdPreTrainedModel",
]
