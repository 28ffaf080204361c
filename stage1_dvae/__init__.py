"""Stage 1 of dallekit: the image tokenizer (Gumbel-softmax dVAE or VQ-VAE), registered with the Auto classes."""

from transformers import AutoConfig, AutoModel

from stage1_dvae.configuration_dvae import DVAEConfig
from stage1_dvae.modeling_dvae import DVAEModel, DVAEOutput

AutoConfig.register(DVAEConfig.model_type, DVAEConfig)
AutoModel.register(DVAEConfig, DVAEModel)

__all__ = ["DVAEConfig", "DVAEModel", "DVAEOutput"]
