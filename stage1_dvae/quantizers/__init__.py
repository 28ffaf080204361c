"""Quantizers of stage 1 (Gumbel-softmax, VQ, FSQ), one module each, behind one interface.

A quantizer maps the encoder's output [B, C, h, w] to decoder input [B, D, h, w] plus a loss and
the chosen codes [B, h, w], and maps codes back to decoder input (`embed_codes`).
"""

from __future__ import annotations

from stage1_dvae.quantizers.base import QuantizerOutput, code_perplexity
from stage1_dvae.quantizers.fsq import FiniteScalarQuantizer
from stage1_dvae.quantizers.gumbel import GumbelQuantizer
from stage1_dvae.quantizers.vq import VectorQuantizer

__all__ = ["FiniteScalarQuantizer", "GumbelQuantizer", "QuantizerOutput", "VectorQuantizer", "code_perplexity"]
