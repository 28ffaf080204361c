"""Scoring with a trained scorer: `TextImageScorer` (model and caption tokenizer in one directory) and retrieval.

```python
scorer = TextImageScorer.from_pretrained("outputs/scorer-digits/scorer")
scorer.score(images, ["the digit seven"] * len(images))   # cosine of each image [N, 3, S, S] with its caption
scorer.similarity(images, captions)                       # [N, T]: every image against every caption
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from dallekit.scorer.modeling_scorer import ScorerModel
from dallekit.text_tokenizer import encode_captions


def unique_captions(captions: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> tuple[list[str], torch.Tensor]:
    """The distinct captions as `tokenizer` normalises them (NFKC, lower case, stripped), in first-seen order,
    and the index [N] of each caption among them."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    keys = [normalizer.normalize_str(caption) if normalizer else caption for caption in captions]
    position = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    return list(position), torch.tensor([position[key] for key in keys], dtype=torch.long)


def top_k_hits(
    true_scores: torch.Tensor, other_scores: torch.Tensor, k: int, counted: torch.Tensor | None = None
) -> torch.Tensor:
    """The chance [N] that each true item ranks within the first `k` among itself and its competitors.

    `true_scores` [N] against `other_scores` [N, M], of which only the `counted` ones [N, M] (bool,
    default all) compete. Ties are broken uniformly at random, in expectation:
    `(k - #higher) / (#tied + 1)`, clipped to [0, 1]; so a constant scorer scores `k / (M + 1)`, not 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    counted = torch.ones_like(other_scores, dtype=torch.bool) if counted is None else counted
    higher = ((other_scores > true_scores.unsqueeze(1)) & counted).sum(dim=1)
    tied = ((other_scores == true_scores.unsqueeze(1)) & counted).sum(dim=1)
    return ((k - higher) / (tied + 1)).clamp(0, 1)


def retrieval_accuracy(
    similarity: torch.Tensor, caption_index: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image→text and text→image top-k accuracy of `similarity` [N images, T distinct captions].

    `caption_index` [N] is each image's caption among the T (`unique_captions`), so captions equal
    to the true one count as correct by construction. Image→text: the true caption ranks within k
    of the T. Text→image: for each of the T captions, the best-scored image carrying it ranks within
    k among the images that do not. Ties count as in `top_k_hits`.
    """
    rows = torch.arange(len(caption_index))
    carries = caption_index.unsqueeze(0) == torch.arange(similarity.shape[1]).unsqueeze(1)  # [T, N]
    best_carrier = similarity.T.masked_fill(~carries, -torch.inf).max(dim=1).values  # [T]
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_top{k}"] = top_k_hits(similarity[rows, caption_index], similarity, k,
                                                      counted=~carries.T).mean().item()
        metrics[f"text_to_image_top{k}"] = top_k_hits(best_carrier, similarity.T, k, counted=~carries).mean().item()
    return metrics


class TextImageScorer:
    """A `ScorerModel` with its caption tokenizer: cosine similarity of images and captions.

    Images are pixels [N, 3, S, S] in [-1, 1] (what the pipeline's `output_type="pt"` returns) at the
    scorer's `image_size`; they may live on any device. Features and scores come back on the CPU in
    float32, computed in batches of `batch_size` in eval mode.
    """

    def __init__(self, model: ScorerModel, tokenizer: PreTrainedTokenizerFast, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> TextImageScorer:
        """The scorer saved in `path` (a directory or Hub id holding the model and `tokenizer.json`)."""
        if Path(path).is_dir() and not (Path(path) / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json: it is not a complete scorer directory "
                f"(save one with `TextImageScorer.save_pretrained(dir)`, or train one with `python -m dallekit.scorer.train`)"
            )
        return cls(ScorerModel.from_pretrained(path, **kwargs), PreTrainedTokenizerFast.from_pretrained(path))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model (`config.json`, `model.safetensors`) and the tokenizer into one directory."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextImageScorer:
        self.model.to(device)
        return self

    def encode(self, captions: str | Sequence[str]) -> torch.Tensor:
        """Caption ids [N, text_len] as the model reads them (longer captions are cut, with a warning)."""
        return encode_captions(self.tokenizer, captions, self.model.config.text_len)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings [N, D] of pixels [N, 3, S, S] in [-1, 1]."""
        return torch.cat([self.model.get_image_features(batch.to(self.device, self.model.dtype)).float().cpu()
                          for batch in pixel_values.split(self.batch_size)])

    @torch.no_grad()
    def text_features(self, captions: str | Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings [T, D] of captions."""
        return torch.cat([self.model.get_text_features(batch.to(self.device)).float().cpu()
                          for batch in self.encode(captions).split(self.batch_size)])

    def similarity(self, pixel_values: torch.Tensor, captions: str | Sequence[str]) -> torch.Tensor:
        """Cosine similarity [N, T] of every image with every caption."""
        return self.image_features(pixel_values) @ self.text_features(captions).T

    def score(self, pixel_values: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [N] of image i with caption i (for reranking: repeat each prompt per candidate)."""
        if isinstance(captions, str) or len(captions) != len(pixel_values):
            got = "one string" if isinstance(captions, str) else f"{len(captions)} captions"
            raise ValueError(
                f"score pairs image i with caption i: pass a list of {len(pixel_values)} captions (one per image), "
                f"got {got}"
            )
        return (self.image_features(pixel_values) * self.text_features(captions)).sum(dim=-1)
