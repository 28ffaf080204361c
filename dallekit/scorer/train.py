"""The contrastive text–image scorer's recipe for the one training loop (`dallekit.training.loop`).

    accelerate launch -m dallekit.scorer.train --config configs/scorer/digits.yaml [--key value ...]

What is the scorer's own: a BPE caption tokenizer trained on the training captions, the symmetric
InfoNCE loss on the training split's (image, caption) pairs (each image randomly shifted by up to
`max_shift` pixels, drawn from the micro-batch's position so a resumed run draws the same), and its
validation: the contrastive loss over all held-out pairs at once (the selection metric) and
image→text / text→image retrieval top-1 and top-5 over the distinct captions
(`scorer.retrieval_accuracy`). A map-style training split is decoded once, one pair per caption of
each image; a stream (`data.streaming`) is decoded batch by batch, each image paired with one of its
captions drawn from the micro-batch's position, so memory does not grow with the data. The export
`output_dir/scorer` holds model and tokenizer (`TextImageScorer.from_pretrained`). The loop writes
checkpoints, logs, `best/` and `metrics.json`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from dallekit.data import DataConfig, TextImageCollator, decode_pairs, load_text_image_dataset, training_captions
from dallekit.data.transforms import random_shift
from dallekit.scorer.configuration_scorer import ScorerConfig
from dallekit.scorer.modeling_scorer import ScorerModel
from dallekit.scorer.scoring import TextImageScorer, retrieval_accuracy, unique_captions
from dallekit.text_tokenizer import encode_captions, load_or_train_text_tokenizer
from dallekit.training.config import (
    PRIOR_ONLY_GRADIENT_CHECKPOINTING,
    ConfigError,
    TrainingConfig,
    run_from_command_line,
)
from dallekit.training.data import training_loader
from dallekit.training.loop import StepOutput, TrainingTask
from dallekit.training.loop import train as train_task


def _default_training() -> TrainingConfig:
    return TrainingConfig(output_dir="outputs/scorer", max_steps=150, batch_size=128, learning_rate=2e-3,
                          warmup_steps=20, eval_every=50, checkpointing_steps=150, log_every=10)


@dataclass
class ScorerTrainConfig:
    """Everything a scorer run needs; loaded from `configs/scorer/*.yaml` plus overrides.

    `model.image_size` is taken from `data.image_size`, and `model.text_vocab_size` is the BPE
    vocabulary size to train (the model is built with the size reached). The defaults are the
    recipe of `configs/scorer/digits.yaml`.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ScorerConfig = field(default_factory=ScorerConfig)
    training: TrainingConfig = field(default_factory=_default_training)
    tokenizer_path: str | None = None  # a saved caption tokenizer (a saved scorer's directory); None: train one
    max_shift: int = 2  # augmentation: shift each training image by up to this many pixels each way; 0: off

    def __post_init__(self) -> None:
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(
                f"max_shift must be a number of pixels >= 0 (0 turns the shifts off), got {self.max_shift}"
            )
        if self.training.gradient_checkpointing:
            raise ValueError(PRIOR_ONLY_GRADIENT_CHECKPOINTING)
        if self.training.init_from and not self.tokenizer_path:
            raise ValueError("training.init_from needs tokenizer_path: the caption tokenizer the scorer there reads "
                             "(its own directory, for a saved scorer)")
        self.model.image_size = self.data.image_size  # the model reads the images the data holds
        self.model.validate()


def augmentation_generator(seed: int, process_index: int, micro_batch: int) -> torch.Generator:
    """The generator of the shifts of one micro-batch: a function of its position, so a resumed run draws the same."""
    state = np.random.SeedSequence([seed, process_index, micro_batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class ScorerTask(TrainingTask[ScorerTrainConfig]):
    """The dual encoder: symmetric InfoNCE over each batch's pairs, selected by the held-out contrastive loss."""

    name = "scorer"
    metric = "loss"

    def setup(self, accelerator: Accelerator) -> None:
        config = self.config
        splits = load_text_image_dataset(config.data)
        self.tokenizer = load_or_train_text_tokenizer(config.tokenizer_path, training_captions(splits["train"]),
                                                      config.model.text_vocab_size, config.model.text_len)
        config.model.text_vocab_size = len(self.tokenizer)
        config.model.pad_token_id = self.tokenizer.pad_token_id
        config.model.bos_token_id = self.tokenizer.bos_token_id
        config.model.eos_token_id = self.tokenizer.eos_token_id
        validation = decode_pairs(splits["validation"], config.data.image_size)
        self.num_skipped = validation.num_skipped
        # A stream is decoded batch by batch (the loop counts its unreadable images); a map-style split at once.
        self.train_stream = splits["train"] if isinstance(splits["train"], datasets.IterableDataset) else None
        self.reported_cut = False  # a stream's captions cut to text_len are reported for its first batch only
        if self.train_stream is None:
            self.decode_training_pairs(splits["train"])
        self.validation_pixels = validation.pixel_values
        self.validation_ids = encode_captions(self.tokenizer, validation.texts, config.model.text_len)
        captions, self.caption_index = unique_captions(validation.texts, self.tokenizer)
        self.caption_ids = encode_captions(self.tokenizer, captions, config.model.text_len)

    def decode_training_pairs(self, split: datasets.Dataset) -> None:
        """Decode every training image once: one pair per caption of each image, the image shared by index."""
        train = decode_pairs(split, self.config.data.image_size)
        self.num_skipped += train.num_skipped
        self.train_pixels = train.pixel_values
        self.image_index = torch.tensor([index for index, captions in enumerate(train.captions) for _ in captions])
        self.train_texts = [caption for captions in train.captions for caption in captions]
        if len(self.train_texts) < self.run.batch_size:
            raise ConfigError(
                f"the training split has {len(self.train_texts)} readable pairs, fewer than training.batch_size "
                f"{self.run.batch_size}: lower training.batch_size"
            )

    def build_model(self) -> ScorerModel:
        return ScorerModel(self.config.model)

    def train_loader(self) -> DataLoader:
        buffer = self.config.data.shuffle_buffer_size
        if self.train_stream is not None:
            return training_loader(self.train_stream, self.run, buffer, TextImageCollator(self.config.data.image_size))
        pairs = TensorDataset(self.image_index, encode_captions(self.tokenizer, self.train_texts,
                                                                self.config.model.text_len))
        return training_loader(pairs, self.run, buffer)

    def validation_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.validation_pixels, self.validation_ids), batch_size=self.run.batch_size)

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        self.scorer: ScorerModel = accelerator.unwrap_model(model, keep_torch_compile=False)
        self.process_index = accelerator.process_index

    def is_empty(self, batch: dict[str, Any] | list[torch.Tensor]) -> bool:
        return isinstance(batch, dict) and batch["pixel_values"].shape[0] == 0

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any] | list[torch.Tensor], step: int,
                      micro_batch: int) -> StepOutput:
        generator = augmentation_generator(self.run.seed, self.process_index, micro_batch)
        if isinstance(batch, dict):  # a stream's batch: the decoded images, each with its captions
            pixel_values = batch["pixel_values"]
            text_ids = self.drawn_caption_ids(batch, generator).to(pixel_values.device)
        else:
            indices, text_ids = batch
            pixel_values = self.train_pixels[indices.cpu()].to(text_ids.device)
        if self.config.max_shift:
            pixel_values = random_shift(pixel_values, self.config.max_shift, generator)
        output = model(pixel_values, text_ids)
        return StepOutput(loss=output.loss, terms={"logit_scale": self.scorer.temperature_scale.detach()},
                          num_examples=text_ids.shape[0])

    def drawn_caption_ids(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The ids of one caption of each image of a streamed batch (of its `captions`, else its `text`), drawn
        with `generator`; captions cut to `text_len` are warned about in the first batch that has them only."""
        all_captions = batch.get("captions", [[] for _ in batch["text"]])
        choices = [captions or [text] for captions, text in zip(all_captions, batch["text"], strict=True)]
        drawn = [captions[int(torch.randint(len(captions), (), generator=generator))] for captions in choices]
        with warnings.catch_warnings(record=True) as cut:
            warnings.simplefilter("always", UserWarning)
            ids = encode_captions(self.tokenizer, drawn, self.config.model.text_len)
        if cut and not self.reported_cut:
            self.reported_cut = True
            warnings.warn(f"{cut[0].message} (later batches of the stream are not reported)", UserWarning,
                          stacklevel=2)
        return ids

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        """Contrastive loss over all N held-out pairs at once, and retrieval over the T distinct captions."""
        scorer = self.scorer
        was_training = scorer.training
        scorer.eval()
        image_embeds, text_embeds = [], []
        for pixel_values, text_ids in loader:  # each process its share, gathered in order
            image_embeds.append(accelerator.gather_for_metrics(scorer.get_image_features(pixel_values)))
            text_embeds.append(accelerator.gather_for_metrics(scorer.get_text_features(text_ids)))
        image_embeds, text_embeds = torch.cat(image_embeds), torch.cat(text_embeds)
        caption_embeds = torch.cat([scorer.get_text_features(ids.to(accelerator.device))
                                    for ids in self.caption_ids.split(self.run.batch_size)])
        loss, _ = scorer.contrastive_loss(image_embeds, text_embeds)
        scorer.train(was_training)
        retrieval = retrieval_accuracy((image_embeds @ caption_embeds.T).float().cpu(), self.caption_index)
        return {"loss": loss.item(), **retrieval, "logit_scale": scorer.temperature_scale.item()}

    def export(self, model: ScorerModel, output_dir: Path) -> Path:
        TextImageScorer(model, self.tokenizer).save_pretrained(output_dir / "scorer")
        return output_dir / "scorer"

    def push_to_hub(self, model: ScorerModel, repo_id: str, message: str) -> None:
        model.push_to_hub(repo_id, commit_message=message)
        self.tokenizer.push_to_hub(repo_id, commit_message=message)


def train(config: ScorerTrainConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train the scorer to `training.max_steps` (or an early stop); returns the run's `metrics.json`."""
    return train_task(ScorerTask(config), accelerator)


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(ScorerTrainConfig, train, argv)


if __name__ == "__main__":
    main()
