"""Speculative Jacobi decoding (`generate(decoding="jacobi")`): the sequential distribution of codes, seeded and
per-group reproducibility, fewer forward passes than codes, clear refusals, and the fused decoder's windows."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper

from stage2_prior import PriorConfig, PriorModel
from stage2_prior.modeling_prior import classifier_free_guidance

FP32 = {"mixed_precision": "no", "compile": False}


def peaked_prior(image_vocab_size: int = 8, image_grid_size: int = 3) -> PriorModel:
    """A tiny random prior whose next-code distributions are peaked and depend on the codes before (output and
    token embeddings scaled up): drafts are accepted often, not always."""
    config = PriorConfig(text_vocab_size=16, text_len=3, image_vocab_size=image_vocab_size,
                         image_grid_size=image_grid_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = PriorModel(config).eval()
    with torch.no_grad():
        prior.lm_head.weight.mul_(20.0)
        prior.decoder.embed_tokens.weight.mul_(5.0)
    return prior


@pytest.fixture(scope="module")
def prior() -> PriorModel:
    return peaked_prior()


def captions(rows: int) -> torch.Tensor:
    """`rows` captions cycling through four."""
    return torch.tensor([[5, 6, 7], [8, 9, 3], [2, 0, 0], [4, 4, 10]]).repeat(rows // 4, 1)


def draw(prior: PriorModel, text: torch.Tensor, seed: int, decoding: str, **settings) -> torch.Tensor:
    codes = prior.generate(text, generator=torch.Generator().manual_seed(seed), decoding=decoding, **FP32, **settings)
    return codes.flatten(1)


@pytest.mark.parametrize("settings", [{"jacobi_window": 4}, {"guidance_scale": 3.0, "top_k": 5}],
                         ids=["window 4", "guidance 3, top-k 5, window 16"])
def test_jacobi_codes_follow_the_sequential_distribution(prior: PriorModel, settings: dict) -> None:
    """Over 2,400 images, the codes at the first, a middle and the last position have the same histogram under
    jacobi as under sequential decoding (chi-square two-sample test). An acceptance rule that always accepts
    fails this (p < 1e-10 at the middle and last positions)."""
    text = captions(2400)
    sequential = draw(prior, text, 0, "sequential", **settings)
    jacobi = draw(prior, text, 1, "jacobi", **settings)
    assert 1.5 < prior.last_decoding_stats.accepted_drafts < 7.5, "drafts are accepted sometimes, not always"
    for position in (0, 4, 8):
        table = torch.stack([torch.bincount(codes[:, position], minlength=8) for codes in (sequential, jacobi)])
        p_value = chi2_contingency(table[:, table.sum(dim=0) > 0].numpy()).pvalue
        assert p_value > 1e-3, f"position {position}: {table.tolist()}"


def exact_image_probabilities(prior: PriorModel, caption: torch.Tensor, guidance_scale: float,
                              warpers: LogitsProcessorList) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the prior's grid [n, N] and the probability [n] that sampling draws it, from the
    full-sequence forward: guided (at `generate`'s default plausibility), warped next-code distributions
    multiplied along the image."""
    num_codes, vocab = prior.config.image_seq_len, prior.config.image_vocab_size
    images = torch.tensor(list(itertools.product(range(vocab), repeat=num_codes)))
    grid = images.view(-1, prior.config.image_grid_size, prior.config.image_grid_size)
    image_positions = slice(prior.image_start - 1, -1)
    with torch.no_grad():
        logits = [prior(prior.build_input_ids(text.expand(len(images), -1), grid), compute_loss=False).logits
                  [:, image_positions, prior.config.text_vocab_size :]
                  for text in (caption, prior.empty_text_ids(1, caption.device))]
    guided = classifier_free_guidance(*logits, guidance_scale, plausibility=0.1) if guidance_scale != 1.0 else logits[0]
    probs = warpers(None, guided.flatten(0, 1)).softmax(dim=-1).view_as(guided)
    return images, probs.gather(-1, images[..., None]).squeeze(-1).prod(dim=-1)


@pytest.mark.parametrize("guidance_scale, top_k, window", [(1.0, None, 2), (3.0, 2, 16)])
def test_jacobi_images_follow_the_exact_image_distribution(guidance_scale: float, top_k: int | None,
                                                           window: int) -> None:
    """On a 2x2 grid of 3 codes (81 images), the images jacobi draws for one caption match the probabilities
    the prior gives them (chi-square goodness of fit over the joint distribution, not one position at a time)."""
    prior = peaked_prior(image_vocab_size=3, image_grid_size=2)
    caption = torch.tensor([[5, 6, 7]])
    warpers = LogitsProcessorList([TopKLogitsWarper(top_k)] if top_k else [])
    images, probabilities = exact_image_probabilities(prior, caption, guidance_scale, warpers)
    codes = draw(prior, caption.expand(6000, -1), 2, "jacobi", guidance_scale=guidance_scale, top_k=top_k,
                 jacobi_window=window)
    index = (codes * 3 ** torch.arange(3, -1, -1)).sum(dim=1)  # the image's row in `images` (base 3)
    assert torch.equal(images[index], codes)
    observed, expected = torch.bincount(index, minlength=len(images)).double(), probabilities.double() * len(codes)
    likely = expected >= 5  # the rare images pooled into one cell
    observed = torch.cat([observed[likely], observed[~likely].sum()[None]])
    expected = torch.cat([expected[likely], expected[~likely].sum()[None]])
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_a_seed_draws_the_same_codes_and_a_group_of_rows_its_own_in_any_batch(prior: PriorModel) -> None:
    """The same seed gives the same codes; with one generator per row, the rows that share one (a group) draw
    the same codes alone and in a batch with other groups, guided too."""
    text = captions(8)[:6]
    for settings in ({}, {"guidance_scale": 3.0, "top_k": 5}):
        first, again = (draw(prior, text, 4, "jacobi", **settings) for _ in "ab")
        assert torch.equal(first, again) and not torch.equal(first, draw(prior, text, 5, "jacobi", **settings))
        groups = [(0, 2, 11), (2, 3, 12), (3, 6, 13)]  # rows [start, end) and their seed
        generators = [generator for start, end, seed in groups
                      for generator in [torch.Generator().manual_seed(seed)] * (end - start)]
        batched = prior.generate(text, generator=generators, decoding="jacobi", **FP32, **settings)
        for start, end, seed in groups:
            alone = prior.generate(text[start:end], generator=[torch.Generator().manual_seed(seed)] * (end - start),
                                   decoding="jacobi", **FP32, **settings)
            assert torch.equal(batched[start:end], alone), (start, end, settings)


def test_jacobi_takes_fewer_forward_passes_than_codes(prior: PriorModel) -> None:
    """With peaked distributions drafts are accepted: an image takes fewer decoder calls than it has codes
    (sequential: one per code), and `last_decoding_stats` says so."""
    text = captions(4)[:1]
    draw(prior, text, 0, "sequential")
    assert prior.last_decoding_stats.forward_passes == 9 and prior.last_decoding_stats.codes_per_pass == 1.0
    passes, accepted = [], []
    for seed in range(10):
        draw(prior, text, seed, "jacobi", jacobi_window=4)
        stats = prior.last_decoding_stats
        assert stats.decoding == "jacobi" and stats.codes == 9
        passes.append(stats.forward_passes)
        accepted.append(stats.accepted_drafts)
    assert sum(passes) / len(passes) < 8 and min(accepted) >= 0 and max(accepted) <= 8
    # Each pass commits at least one code, a code is an accepted draft or redrawn: passes - 1 >= 8 - accepted.
    assert all(p - 1 >= 8 - a for p, a in zip(passes, accepted))


def test_jacobi_refuses_what_it_cannot_do(prior: PriorModel) -> None:
    """Kept codes, no cache, greedy decoding and bad arguments are refused clearly under `jacobi`; `auto` then
    samples sequentially."""
    text, codes = captions(4), torch.zeros(4, 3, 3, dtype=torch.long)
    keep = torch.zeros(4, 3, 3, dtype=torch.bool)
    for arguments, what in (({"init_codes": codes, "keep_mask": keep}, "kept codes"),
                            ({"init_codes": codes, "init_rows": 1}, "kept codes"),
                            ({"use_cache": False}, "use_cache=False"), ({"do_sample": False}, "do_sample=False")):
        with pytest.raises(ValueError, match=f"decoding='jacobi' cannot run with {what}"):
            prior.generate(text, decoding="jacobi", **arguments)
        prior.generate(text, decoding="auto", **arguments)
        assert prior.last_decoding_stats.decoding == "sequential"
    with pytest.raises(ValueError, match="decoding must be 'sequential', 'jacobi' or 'auto', got 'parallel'"):
        prior.generate(text, decoding="parallel")
    with pytest.raises(ValueError, match="jacobi_window must be >= 1, got 0"):
        prior.generate(text, decoding="jacobi", jacobi_window=0)


@pytest.mark.parametrize("kv_heads", [2, 1])  # 1: grouped-query attention
def test_fused_decoder_windows_with_their_own_positions_give_the_full_forward_logits(kv_heads: int) -> None:
    """`FusedDecoder(..., last=n)` with one row of positions per row (rows at different points of their images,
    feeding again over stale cache entries) gives the logits of the plain full-sequence forward."""
    prior = PriorModel(PriorConfig(text_vocab_size=16, text_len=3, image_vocab_size=8, image_grid_size=3,
                                   hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=kv_heads)).eval()
    text, codes = torch.randint(3, 16, (3, 3)), torch.randint(0, 8, (3, 3, 3))
    input_ids = prior.build_input_ids(text, codes)
    with torch.no_grad():
        expected = prior(input_ids, compute_loss=False).logits[..., prior.config.text_vocab_size :]
        decoding = prior._decoding(3, prior._fused(torch.float32))
        prompt = torch.arange(prior.image_start)
        prior._image_logits(input_ids[:, prompt], prompt, decoding)
        stale = prior.build_input_ids(text, (codes + 1) % 8)  # wrong codes, fed first, then fed over
        for sequence, starts in ((stale, [4, 4, 4]), (stale, [5, 4, 8]), (input_ids, [4, 4, 4])):
            positions = torch.tensor(starts)[:, None] + torch.arange(3)
            prior._image_logits(sequence.gather(1, positions), positions, decoding)
        positions = torch.tensor([7, 6, 5])[:, None] + torch.arange(4)
        logits = prior._image_logits(input_ids.gather(1, positions), positions, decoding)
    assert logits.shape == (3, 4, 8)
    torch.testing.assert_close(logits, expected.gather(1, positions[..., None].expand(-1, -1, 8)), atol=1e-5, rtol=0)
