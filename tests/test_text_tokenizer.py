"""Tests for dallekit.text_tokenizer: training, encoding to text_len, truncation, decoding, save/load."""

import logging
import warnings

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dallekit.data import DataConfig, load_text_image_dataset
from dallekit.text_tokenizer import EMPTY_CAPTION, encode_captions, train_text_tokenizer

VOCAB_SIZE, TEXT_LEN = 300, 16
PAD, BOS, EOS = 0, 1, 2
PROMPTS = ["a handwritten digit seven", "The Number 3", EMPTY_CAPTION, "a zebra, drawn by hand!"]


@pytest.fixture(scope="module")
def captions() -> list[str]:
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=8))
    return list(splits["train"]["text"])


@pytest.fixture(scope="module")
def tokenizer(captions) -> PreTrainedTokenizerFast:
    return train_text_tokenizer(captions, vocab_size=VOCAB_SIZE, text_len=TEXT_LEN)


def test_vocabulary_and_special_tokens(tokenizer):
    assert 256 + 3 < len(tokenizer) <= VOCAB_SIZE
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [PAD, BOS, EOS]
    assert tokenizer.convert_ids_to_tokens([PAD, BOS, EOS]) == ["<pad>", "<bos>", "<eos>"]
    assert tokenizer.model_max_length == TEXT_LEN


def test_training_logs_vocabulary_size(captions, caplog):
    with caplog.at_level(logging.INFO, logger="dallekit.text_tokenizer"):
        tokenizer = train_text_tokenizer(captions[:100], vocab_size=VOCAB_SIZE)
    assert f"on 100 captions: {len(tokenizer)} of at most {VOCAB_SIZE} tokens" in caplog.text


def test_training_captions_encode_to_text_len_and_decode_back(tokenizer, captions):
    ids = encode_captions(tokenizer, captions)
    assert ids.shape == (len(captions), TEXT_LEN) and ids.dtype == torch.long
    for row in ids.tolist():
        eos_at = row.index(EOS)
        assert BOS not in row and PAD not in row[:eos_at] and set(row[eos_at + 1:]) <= {PAD}
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [caption.lower() for caption in captions]


def test_captions_are_case_insensitive(tokenizer):
    ids = encode_captions(tokenizer, ["The Digit SEVEN", "the digit seven", "  the digit seven "])
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])


def test_unseen_text_encodes_byte_level(tokenizer):
    prompt = "a zebra, ÿ 中 drawn <eos> by hand"
    ids = encode_captions(tokenizer, prompt, text_len=64)
    assert ids.shape == (1, 64)
    assert ids[0].tolist().count(EOS) == 1  # typed "<eos>" is text, not the special token
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [prompt]


def test_empty_caption_is_eos_then_padding(tokenizer):
    assert encode_captions(tokenizer, EMPTY_CAPTION).tolist() == [[EOS] + [PAD] * (TEXT_LEN - 1)]
    ids = encode_captions(tokenizer, PROMPTS)
    assert ids[2].tolist() == [EOS] + [PAD] * (TEXT_LEN - 1)
    assert torch.equal(ids[0], encode_captions(tokenizer, PROMPTS[0])[0])
    assert tokenizer.batch_decode(ids, skip_special_tokens=True)[2] == ""


def test_long_caption_is_truncated_with_one_warning(captions, caplog):
    tokenizer = train_text_tokenizer(captions, vocab_size=VOCAB_SIZE, text_len=TEXT_LEN)  # transformers logs once
    long_prompt = "a handwritten digit " * 13  # 3 tokens per repeat, + eos
    length = len(tokenizer(long_prompt, verbose=False)["input_ids"])
    assert length == 40
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = encode_captions(tokenizer, ["the number 3", long_prompt, long_prompt])
    assert len(caught) == 1 and caught[0].category is UserWarning
    # only our warning, not also transformers' "longer than the maximum length" log
    assert not [record for record in caplog.records if record.name.startswith("transformers")]
    dropped = length - TEXT_LEN
    message = str(caught[0].message)
    assert f"caption 1 (\"a handwritten digit a handwritten ...\") is {length} tokens, {dropped} dropped" in message
    assert "caption 2 (" in message and "caption 0" not in message and message.endswith(f"text_len is {TEXT_LEN}")
    assert ids.shape == (3, TEXT_LEN) and ids[1:, -1].tolist() == [EOS, EOS]
    assert tokenizer.batch_decode(ids[1:2], skip_special_tokens=True) == [("a handwritten digit " * 5).strip()]

    with pytest.warns(UserWarning, match=rf"is {length} tokens, {length - 32} dropped: text_len is 32"):
        assert encode_captions(tokenizer, long_prompt, text_len=32)[0, -1] == EOS


def test_fitting_caption_does_not_warn(tokenizer):
    fits = "a handwritten digit " * 5  # 15 tokens + eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = encode_captions(tokenizer, [fits, EMPTY_CAPTION])
    assert ids[0, -1] == EOS and PAD not in ids[0].tolist()


@pytest.mark.parametrize("subfolder", [None, "tokenizer"])
@pytest.mark.parametrize("loader", [PreTrainedTokenizerFast, AutoTokenizer])
def test_save_and_load_round_trip(tokenizer, captions, tmp_path, loader, subfolder):
    tokenizer.save_pretrained(tmp_path / subfolder if subfolder else tmp_path)
    loaded = loader.from_pretrained(tmp_path, **({"subfolder": subfolder} if subfolder else {}))
    prompts = captions[:50] + PROMPTS + ["THE <pad> digit " * 8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last prompt is cut, in both
        assert torch.equal(encode_captions(loaded, prompts), encode_captions(tokenizer, prompts))
    assert loaded.model_max_length == TEXT_LEN
    assert (loaded.padding_side, loaded.truncation_side) == ("right", "right")
    assert loaded.all_special_tokens == tokenizer.all_special_tokens
    assert [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id] == [PAD, BOS, EOS]
    # normaliser, pre-tokenizer, post-processor (appends <eos>), decoder and vocabulary all saved
    assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    decoded = loaded.batch_decode(encode_captions(loaded, PROMPTS), skip_special_tokens=True)
    assert decoded == [p.lower() for p in PROMPTS]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"vocab_size": 259}, "vocab_size"),
        ({"text_len": 1}, "text_len"),
        ({"min_frequency": 0}, "min_frequency"),
    ],
)
def test_bad_training_arguments(captions, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        train_text_tokenizer(captions[:10], **kwargs)


def test_bad_captions():
    with pytest.raises(ValueError, match="captions is empty"):
        train_text_tokenizer([])
    with pytest.raises(ValueError, match=r"captions\[1\] is None"):
        train_text_tokenizer(["a cat", None])


def test_bad_encode_arguments(tokenizer):
    with pytest.raises(ValueError, match="text_len"):
        encode_captions(tokenizer, "a cat", text_len=1)
    with pytest.raises(ValueError, match="captions is empty"):
        encode_captions(tokenizer, [])
