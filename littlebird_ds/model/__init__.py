from .modeling import (
    LittleBirdForMaskedLM,
    LittleBirdForQuestionAnswering,
    LittleBirdModel,
    LittleBirdModelOutput,
    LittleBirdPreTrainedModel,
)

__all__ = [
    "LittleBirdForMaskedLM",
    "LittleBirdForQuestionAnswering",
    "LittleBirdModel",
    "LittleBirdModelOutput",
    "LittleBirdPreTrainedModel",
]
