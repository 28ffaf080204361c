"""The contrastive text–image scorer (a CNN and a CLIP text transformer), registered with the Auto classes."""

from transformers import AutoConfig, AutoModel

from dallekit.scorer.configuration_scorer import ScorerConfig
from dallekit.scorer.modeling_scorer import ScorerModel, ScorerOutput
from dallekit.scorer.scoring import TextImageScorer, retrieval_accuracy, top_k_hits, unique_captions

AutoConfig.register(ScorerConfig.model_type, ScorerConfig)
AutoModel.register(ScorerConfig, ScorerModel)

__all__ = [
    "ScorerConfig",
    "ScorerModel",
    "ScorerOutput",
    "TextImageScorer",
    "retrieval_accuracy",
    "top_k_hits",
    "unique_captions",
]
