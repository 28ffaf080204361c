"""Stage 2 of dallekit: the autoregressive prior over text and image codes, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel

from stage2_prior.configuration_prior import PriorConfig
from stage2_prior.modeling_prior import PriorModel, PriorOutput

AutoConfig.register(PriorConfig.model_type, PriorConfig)
AutoModel.register(PriorConfig, PriorModel)

__all__ = ["PriorConfig", "PriorModel", "PriorOutput"]
