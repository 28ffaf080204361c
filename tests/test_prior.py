"""Stage-2 prior: sequence layout, restricted logits, KV-cache sampling, guidance, dropout, memorisation, save/load."""

from __future__ import annotations

import pytest
import torch

from stage2_prior import PriorConfig, PriorModel
from stage2_prior.modeling_prior import classifier_free_guidance


def tiny_prior_config(**overrides) -> PriorConfig:
    values = dict(
        text_vocab_size=40, text_len=6, image_vocab_size=16, image_grid_size=4, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    )
    values.update(overrides)
    return PriorConfig(**values)


@pytest.fixture
def prior() -> PriorModel:
    return PriorModel(tiny_prior_config()).eval()


def captions(batch: int) -> torch.Tensor:
    return torch.randint(3, 40, (batch, 6))


def test_greedy_sampling_with_and_without_cache_is_identical(prior: PriorModel) -> None:
    text = captions(3)
    with_cache = prior.generate(text, do_sample=False, use_cache=True)
    without_cache = prior.generate(text, do_sample=False, use_cache=False)
    assert with_cache.shape == (3, 4, 4) and with_cache.dtype == torch.int64
    assert torch.equal(with_cache, without_cache)
    guided = [prior.generate(text, do_sample=False, guidance_scale=3.0, use_cache=c) for c in (True, False)]
    assert torch.equal(*guided)


def test_seeded_sampling_is_reproducible_and_codes_are_valid(prior: PriorModel) -> None:
    text = captions(4)
    first = prior.generate(text, guidance_scale=2.0, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    again = prior.generate(text, guidance_scale=2.0, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    other = prior.generate(text, guidance_scale=2.0, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() < 16


def test_logits_are_restricted_by_position(prior: PriorModel) -> None:
    text = captions(2)
    codes = torch.randint(0, 16, (2, 4, 4))
    logits = prior(prior.build_input_ids(text, codes)).logits
    floor = torch.finfo(logits.dtype).min
    text_positions, image_positions = logits[:, : prior.image_start - 1], logits[:, prior.image_start - 1:]
    assert (text_positions[..., 40:] == floor).all() and (text_positions[..., :40] > floor).all()
    assert (image_positions[..., :40] == floor).all() and (image_positions[..., 40:] > floor).all()
    # even a model that prefers text ids can only sample image codes
    with torch.no_grad():
        prior.lm_head.weight[:40] += 100.0
    sampled = prior.generate(text, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.min() >= 0 and sampled.max() < 16


def test_guidance_formula_and_scale_one() -> None:
    conditional, unconditional = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 1.0, 1.0])
    torch.testing.assert_close(classifier_free_guidance(conditional, unconditional, 1.0), conditional)
    torch.testing.assert_close(classifier_free_guidance(conditional, unconditional, 3.0), torch.tensor([4.0, -2.0, -5.0]))


def test_batched_guidance_matches_two_separate_forwards(prior: PriorModel) -> None:
    text = captions(2)
    first_code = prior.generate(text, do_sample=False, guidance_scale=4.0)[:, 0, 0]
    conditional = prior(prior.build_input_ids(text), compute_loss=False).logits[:, -1, 40:]
    empty = prior.empty_text_ids(2, text.device)
    unconditional = prior(prior.build_input_ids(empty), compute_loss=False).logits[:, -1, 40:]
    expected = classifier_free_guidance(conditional, unconditional, 4.0).argmax(-1)
    assert torch.equal(first_code, expected)
    assert torch.equal(prior.generate(text, do_sample=False, guidance_scale=1.0),
                       prior.generate(text, do_sample=False))


def test_priming_keeps_the_given_rows(prior: PriorModel) -> None:
    text, init = captions(2), torch.randint(0, 16, (2, 4, 4))
    completed = prior.generate(text, init_codes=init, init_rows=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(completed[:, :2], init[:, :2])
    with pytest.raises(ValueError, match="priming needs"):
        prior.generate(text, init_codes=init, init_rows=5)


def test_loss_weights_text_and_image_and_ignores_padding() -> None:
    model = PriorModel(tiny_prior_config(image_loss_weight=0.75, text_loss_weight=0.25))
    text = torch.tensor([[5, 6, 2, 0, 0, 0]])  # "x y" <eos> <pad> <pad> <pad>
    output = model(model.build_input_ids(text, torch.randint(0, 16, (1, 4, 4))))
    assert output.loss.item() == pytest.approx(0.25 * output.text_loss.item() + 0.75 * output.image_loss.item())
    # the text loss covers the three real targets ("x", "y", <eos>) and no padding
    manual = torch.nn.functional.cross_entropy(output.logits[0, :3], text[0, :3])
    assert output.text_loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_tiny_prior_memorises_caption_to_codes() -> None:
    """Trained on four (caption, codes) pairs, greedy sampling reproduces each caption's codes."""
    torch.manual_seed(0)
    model = PriorModel(tiny_prior_config())
    text = torch.tensor([[5 + i, 9, 2, 0, 0, 0] for i in range(4)])
    codes = torch.randint(0, 16, (4, 4, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(model.build_input_ids(text, codes)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert torch.equal(model.generate(text, do_sample=False), codes)


def test_save_and_load_round_trip(prior: PriorModel, tmp_path) -> None:
    from transformers import AutoModel

    prior.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PriorModel)
    text = captions(2)
    assert torch.equal(loaded.generate(text, do_sample=False), prior.generate(text, do_sample=False))


def test_config_rejects_inconsistent_sizes() -> None:
    with pytest.raises(Exception, match="multiple of num_attention_heads"):
        tiny_prior_config(hidden_size=30)
    with pytest.raises(Exception, match="bos_token_id must be a text token id"):
        tiny_prior_config(bos_token_id=99)
    with pytest.raises(Exception, match=r"residual_dropout must be in \[0, 1\) \(0 turns it off\), got 1.0"):
        tiny_prior_config(residual_dropout=1.0)
    with pytest.raises(Exception, match=r"embedding_dropout must be in \[0, 1\)"):
        tiny_prior_config(embedding_dropout=-0.1)


DROPOUT = dict(attention_dropout=0.1, residual_dropout=0.2, embedding_dropout=0.1)


def test_dropout_acts_in_training_only_and_adds_no_weights(tmp_path) -> None:
    torch.manual_seed(0)
    plain = PriorModel(tiny_prior_config())
    torch.manual_seed(0)
    regularised = PriorModel(tiny_prior_config(**DROPOUT))
    assert plain.state_dict().keys() == regularised.state_dict().keys()
    input_ids = plain.build_input_ids(captions(2), torch.randint(0, 16, (2, 4, 4)))

    regularised.train()
    first, second = regularised(input_ids).logits, regularised(input_ids).logits
    assert not torch.equal(first, second), "dropout draws new masks in training"
    regularised.eval()
    torch.testing.assert_close(regularised(input_ids).logits, plain.eval()(input_ids).logits)

    # dropout 0 (the default) is the model without dropout, in training too, and draws no random numbers
    plain.train()
    rng = torch.get_rng_state()
    torch.testing.assert_close(plain(input_ids).logits, plain.eval()(input_ids).logits)
    assert torch.equal(torch.get_rng_state(), rng)

    regularised.save_pretrained(tmp_path)
    loaded = PriorModel.from_pretrained(tmp_path)  # strict: fails on any missing or unexpected weight
    assert loaded.config.residual_dropout == 0.2 and not loaded.training
    torch.testing.assert_close(loaded(input_ids).logits, plain(input_ids).logits)


def test_residual_dropout_survives_torch_compile() -> None:
    """The residual dropout hooks are traced by torch.compile: active in training, off in eval."""
    model = PriorModel(tiny_prior_config(residual_dropout=0.5))
    input_ids = model.build_input_ids(captions(2), torch.randint(0, 16, (2, 4, 4)))
    expected = model.eval()(input_ids).logits
    compiled = torch.compile(model, backend="aot_eager")  # dynamo's tracing without inductor's slow codegen
    torch.testing.assert_close(compiled(input_ids).logits, expected)
    model.train()
    output = compiled(input_ids)
    output.loss.backward()
    assert not torch.allclose(output.logits, expected) and torch.isfinite(output.loss)
