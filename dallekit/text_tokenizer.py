"""The caption tokenizer of the prior, the scorer and the pipeline: a byte-level BPE trained on captions.

Each caption becomes exactly `text_len` ids, `[caption tokens, <eos>, <pad>, ...]`; the prior
prepends `<bos>` itself. Captions are case-insensitive (NFKC, lower-cased, outer whitespace
stripped) and any text encodes, unseen words included, because the alphabet is all 256 bytes.
Special tokens are `<pad>` = 0, `<bos>` = 1, `<eos>` = 2, and literal "<eos>" typed in a caption
is plain text, never the special token. The tokenizer is a `transformers.PreTrainedTokenizerFast`:
`save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it, and its own
`batch_decode(ids, skip_special_tokens=True)` gives the lower-cased captions back.
"""

from __future__ import annotations

import itertools
import logging
import textwrap
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in this order
EMPTY_CAPTION = ""
"""The unconditional caption of classifier-free guidance: it encodes to `[<eos>, <pad>, ...]`."""

_NUM_BYTES = len(pre_tokenizers.ByteLevel.alphabet())  # 256
_NO_CAPTION = object()  # what `next` gives for an empty iterable of captions
NAMED_CUT_CAPTIONS = 3  # the warning about captions longer than text_len names this many, and counts the others


def _check_text_len(text_len: int) -> None:
    if text_len < 2:
        raise ValueError(f"text_len must be >= 2 (caption tokens plus <eos>), got {text_len}")


def load_or_train_text_tokenizer(
    path: str | None, captions: Iterable[str], vocab_size: int, text_len: int
) -> PreTrainedTokenizerFast:
    """The caption tokenizer saved at `path` (what a fine-tuned model keeps reading), or, without one, a new one
    trained on `captions`."""
    if path:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return train_text_tokenizer(captions, vocab_size, text_len)


def train_text_tokenizer(
    captions: Iterable[str], vocab_size: int = 1024, text_len: int = 32, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens trained on `captions`, encoding to `text_len` ids."""
    min_vocab_size = _NUM_BYTES + len(SPECIAL_TOKENS) + 1
    if vocab_size < min_vocab_size:
        raise ValueError(
            f"vocab_size must be >= {min_vocab_size} ({_NUM_BYTES} bytes, {len(SPECIAL_TOKENS)} special "
            f"tokens and at least one merge), got {vocab_size}"
        )
    _check_text_len(text_len)
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    captions = iter(captions)  # read once as it trains, never all in memory: a stream's captions may not fit
    first = next(captions, _NO_CAPTION)
    if first is _NO_CAPTION:
        raise ValueError("captions is empty: pass the training split's captions, e.g. splits['train']['text']")
    count = 0

    def checked() -> Iterator[str]:
        nonlocal count
        for caption in itertools.chain([first], captions):
            if not isinstance(caption, str):
                raise ValueError(
                    f"captions[{count}] is {caption!r}, not a string: drop or fill missing captions before training"
                )
            count += 1
            yield caption

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # ByteLevel decoding keeps the space the pre-tokenizer put in front: strip it again.
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(checked(), trainer=trainer)
    # Saved in tokenizer.json, so it survives save_pretrained/from_pretrained. transformers 5 neither
    # serialises `add_eos_token` nor reports it here (False); setting `add_bos_token`/`add_eos_token`
    # would rebuild this post-processor from those flags.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN))]
    )
    logger.info(
        "trained caption tokenizer on %d captions: %d of at most %d tokens",
        count, tokenizer.get_vocab_size(), vocab_size,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=text_len,
        padding_side="right",
        truncation_side="right",
        split_special_tokens=True,  # "<eos>" typed in a caption is text, not the special token
    )


def encode_captions(
    tokenizer: PreTrainedTokenizerFast, captions: str | Sequence[str], text_len: int | None = None
) -> torch.LongTensor:
    """Ids of `captions` as `[B, text_len]`: tokens, `<eos>`, then `<pad>`s (default `model_max_length`).

    Longer captions are cut to `text_len - 1` tokens plus `<eos>`, with one `UserWarning` per call
    counting the cut captions and naming the first few (`NAMED_CUT_CAPTIONS`) with how many tokens
    each lost. `EMPTY_CAPTION` gives `[<eos>, <pad>, ...]`.
    """
    text_len = tokenizer.model_max_length if text_len is None else text_len
    _check_text_len(text_len)
    batch = [captions] if isinstance(captions, str) else list(captions)
    if not batch:
        raise ValueError("captions is empty: pass at least one caption (EMPTY_CAPTION for the unconditional input)")
    # Untruncated lengths, with <eos>; verbose=False because the warning below replaces transformers' own.
    lengths = tokenizer(batch, return_length=True, return_attention_mask=False, verbose=False)["length"]
    cut = [
        (index, caption, length)
        for index, (caption, length) in enumerate(zip(batch, lengths, strict=True))
        if length > text_len
    ]
    if cut:
        named = "; ".join(
            f'caption {index} ("{textwrap.shorten(caption, width=40, placeholder=" ...")}") is {length} tokens, '
            f"{length - text_len} dropped"
            for index, caption, length in cut[:NAMED_CUT_CAPTIONS]
        )
        more = f"; and {len(cut) - NAMED_CUT_CAPTIONS} more" if len(cut) > NAMED_CUT_CAPTIONS else ""
        warnings.warn(
            f"{len(cut)} of {len(batch)} captions are longer than the model reads and were cut: {named}{more}: "
            f"text_len is {text_len}",
            UserWarning,
            stacklevel=2,
        )
    encoded = tokenizer(
        batch,
        padding="max_length",
        truncation=True,
        max_length=text_len,
        return_tensors="pt",
        return_attention_mask=False,
    )
    return encoded["input_ids"]
