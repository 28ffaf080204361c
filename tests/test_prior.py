"""Stage-2 prior: sequence layout, restricted logits, KV-cache sampling against a plain reference loop, guidance,
priming, bf16 and compiled sampling, dropout, memorisation, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stage2_prior import PriorConfig, PriorModel
from stage2_prior.dropout import BitsDropout
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


def reference_codes(
    prior: PriorModel, text: torch.Tensor, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
    warpers: LogitsProcessorList | None = None, init_codes: torch.Tensor | None = None, init_rows: int = 0,
    keep_mask: torch.Tensor | None = None, negative: torch.Tensor | None = None, plausibility: float = 0.1,
) -> torch.Tensor:
    """Codes [B, h, w] by the plainest computation: every step runs the whole sequence through `forward` (no
    cache, full restricted vocabulary), the unconditional branch (the empty caption, or `negative`) as a second
    forward, guidance with `plausibility` (`generate`'s default); argmax without `generator`, else the warped
    distribution sampled with `torch.multinomial`; a code where `keep_mask` is True is replaced by `init_codes`'
    after it is drawn."""
    grid, text_vocab = prior.config.image_grid_size, prior.config.text_vocab_size
    codes = init_codes[:, :init_rows].flatten(1) if init_rows else text.new_zeros(len(text), 0)
    unconditional_text = negative if negative is not None else prior.empty_text_ids(len(text), text.device)

    def next_logits(caption_ids: torch.Tensor) -> torch.Tensor:
        input_ids = torch.cat([prior.build_input_ids(caption_ids), codes + text_vocab], dim=1)
        return prior(input_ids, compute_loss=False).logits[:, -1, text_vocab:]

    with torch.no_grad():
        while codes.shape[1] < grid * grid:
            logits = next_logits(text)
            if guidance_scale != 1.0:
                logits = classifier_free_guidance(logits, next_logits(unconditional_text), guidance_scale, plausibility)
            if generator is None:
                code = logits.argmax(-1, keepdim=True)
            else:
                code = torch.multinomial((warpers or LogitsProcessorList())(None, logits).softmax(-1), 1,
                                         generator=generator)
            if keep_mask is not None:
                index = codes.shape[1]
                kept = keep_mask.flatten(1)[:, index : index + 1]
                code = torch.where(kept, init_codes.flatten(1)[:, index : index + 1], code)
            codes = torch.cat([codes, code], dim=1)
    return codes.view(-1, grid, grid)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_codes_match_a_full_sequence_argmax_loop(prior: PriorModel, guidance_scale: float) -> None:
    """The cached loop (static cache, image rows of lm_head only, guidance in one batch) equals the plain loop."""
    text = captions(3)
    expected = reference_codes(prior, text, guidance_scale)
    for use_cache in (True, False):
        codes = prior.generate(text, guidance_scale=guidance_scale, do_sample=False, use_cache=use_cache,
                               mixed_precision="no")
        assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
        assert torch.equal(codes, expected), f"use_cache={use_cache}"


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_seeded_sampling_draws_what_a_plain_sampling_loop_draws(prior: PriorModel, guidance_scale: float) -> None:
    """Same seed, same codes as the plain loop, with no-op settings (temperature 1, top_k >= the codes) too."""
    text = captions(4)
    settings = [dict(), dict(temperature=0.7, top_k=5, top_p=0.8), dict(temperature=1.0, top_k=16, top_p=1.0)]
    for setting in settings:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(setting.get("temperature", 1.0))])
        if "top_k" in setting:
            warpers += [TopKLogitsWarper(setting["top_k"]), TopPLogitsWarper(setting["top_p"])]
        expected = reference_codes(prior, text, guidance_scale, torch.Generator().manual_seed(3), warpers)
        codes = prior.generate(text, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(3),
                               mixed_precision="no", **setting)
        assert torch.equal(codes, expected), setting


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, two query heads per kv head
def test_fused_cached_decoder_matches_the_transformers_decoder(kv_heads: int) -> None:
    """The sampling loop's fused decoder (prompt of repeated rows computed once, then one-token steps with the
    static cache) gives the image logits of the plain full-sequence `forward`: to float rounding in fp32, and
    close to the decoder's own bf16 autocast in bf16."""
    prior = PriorModel(tiny_prior_config(num_key_value_heads=kv_heads)).eval()
    with torch.no_grad():  # random norm weights, so that folding them into the projections is exercised
        for norm in [prior.decoder.norm] + [n for layer in prior.decoder.layers
                                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.uniform_(0.5, 1.5)
    text = captions(3)[[0, 1, 0, 2, 1]]  # repeated captions share their prompt
    input_ids = prior.build_input_ids(text, torch.randint(0, 16, (5, 4, 4)))
    image_positions = slice(prior.image_start - 1, -1)
    with torch.no_grad():
        expected = prior(input_ids, compute_loss=False).logits[:, image_positions, 40:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = prior(input_ids, compute_loss=False).logits[:, image_positions, 40:]
        for dtype, reference, tolerance in ((torch.float32, expected, 1e-5), (torch.bfloat16, expected_bf16, 0.01)):
            decoding = prior._decoding(len(input_ids), prior._fused(dtype))
            positions = torch.arange(input_ids.shape[1])
            prompt = positions[: prior.image_start]
            logits = [prior._image_logits(input_ids[:, prompt], prompt, decoding)]
            logits += [prior._image_logits(input_ids[:, [p]], positions[[p]], decoding)
                       for p in range(prior.image_start, input_ids.shape[1] - 1)]
            torch.testing.assert_close(torch.stack(logits, dim=1), reference, atol=tolerance, rtol=0)
        # Made once per weights and dtype: calls in both dtypes alternate without rebuilding (nor recompiling).
        fp32 = prior._fused(torch.float32)
        assert prior._fused(torch.bfloat16) is not fp32 and prior._fused(torch.float32) is fp32


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


def test_guidance_plausibility_refuses_codes_the_prompted_model_finds_unlikely() -> None:
    """Plain guidance promotes code 1, which the prompted model finds e^-3 (5%) as likely as code 0 (the
    unconditional branch finds it even less likely); at plausibility 0.1 it is refused and code 0 wins; at 0.04
    code 1 is plausible enough, and everything plausible keeps its plain guided logit."""
    conditional, unconditional = torch.tensor([[2.0, -1.0, 0.0]]), torch.tensor([[2.0, -4.0, 0.0]])
    plain = classifier_free_guidance(conditional, unconditional, 3.0)
    assert plain.argmax().item() == 1
    constrained = classifier_free_guidance(conditional, unconditional, 3.0, plausibility=0.1)
    assert constrained.argmax().item() == 0
    assert torch.equal(constrained, torch.tensor([[2.0, float("-inf"), 0.0]]))
    assert torch.equal(classifier_free_guidance(conditional, unconditional, 3.0, plausibility=0.04), plain)


@pytest.mark.parametrize("plausibility", [-0.1, 1.0, float("nan")])
def test_generate_refuses_a_plausibility_outside_zero_one(prior: PriorModel, plausibility: float) -> None:
    with pytest.raises(ValueError, match=r"guidance_plausibility must be in \[0, 1\)"):
        prior.generate(captions(1), guidance_scale=3.0, guidance_plausibility=plausibility)


def test_plain_guidance_is_plausibility_zero(prior: PriorModel) -> None:
    """`guidance_plausibility=0` is plain guidance, through the cached loop as through the plain one; near 1 only
    the prompted model's likeliest code is left, so greedy guided codes are the unguided ones."""
    text = captions(3)
    plain = prior.generate(text, guidance_scale=3.0, guidance_plausibility=0.0, do_sample=False, mixed_precision="no")
    assert torch.equal(plain, reference_codes(prior, text, 3.0, plausibility=0.0))
    only_likeliest = prior.generate(text, guidance_scale=3.0, guidance_plausibility=0.999, do_sample=False,
                                    mixed_precision="no")
    assert torch.equal(only_likeliest, prior.generate(text, do_sample=False, mixed_precision="no"))
    assert not torch.equal(plain, only_likeliest)


def test_batched_guidance_matches_two_separate_forwards(prior: PriorModel) -> None:
    text = captions(2)
    first_code = prior.generate(text, do_sample=False, guidance_scale=4.0, mixed_precision="no")[:, 0, 0]
    conditional = prior(prior.build_input_ids(text), compute_loss=False).logits[:, -1, 40:]
    empty = prior.empty_text_ids(2, text.device)
    unconditional = prior(prior.build_input_ids(empty), compute_loss=False).logits[:, -1, 40:]
    expected = classifier_free_guidance(conditional, unconditional, 4.0, plausibility=0.1).argmax(-1)
    assert torch.equal(first_code, expected)
    assert torch.equal(prior.generate(text, do_sample=False, guidance_scale=1.0),
                       prior.generate(text, do_sample=False))


def test_priming_keeps_the_given_rows(prior: PriorModel) -> None:
    text, init = captions(2), torch.randint(0, 16, (2, 4, 4))
    completed = prior.generate(text, init_codes=init, init_rows=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(completed[:, :2], init[:, :2])
    greedy = prior.generate(text, init_codes=init, init_rows=1, guidance_scale=2.0, do_sample=False,
                            mixed_precision="no")
    assert torch.equal(greedy, reference_codes(prior, text, 2.0, init_codes=init, init_rows=1))
    with pytest.raises(ValueError, match="priming needs"):
        prior.generate(text, init_codes=init, init_rows=5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_keep_mask_forces_its_codes_and_samples_the_others_as_the_reference(prior: PriorModel,
                                                                                use_cache: bool) -> None:
    """Kept codes anywhere in the grid (not only leading rows) are forced in raster order: the sampled ones equal
    a plain loop's that forces them too, seeded and guided."""
    text, init = captions(3), torch.randint(0, 16, (3, 4, 4))
    keep = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[:, 0, 0] = True  # a shared kept prefix, and rows that differ after it
    keep[:, 3, 3] = True  # a shared kept tail: never sampled
    codes = prior.generate(text, init_codes=init, keep_mask=keep, guidance_scale=2.0, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(0), mixed_precision="no")
    assert torch.equal(codes[keep], init[keep])
    expected = reference_codes(prior, text, 2.0, generator=torch.Generator().manual_seed(0), init_codes=init,
                               keep_mask=keep)
    assert torch.equal(codes, expected)


def test_an_all_sampled_mask_is_plain_sampling_and_an_all_kept_mask_the_image(prior: PriorModel) -> None:
    text, init = captions(2), torch.randint(0, 16, (2, 4, 4))
    plain = prior.generate(text, generator=torch.Generator().manual_seed(5), guidance_scale=3.0)
    nothing_kept = prior.generate(text, init_codes=init, keep_mask=torch.zeros(2, 4, 4, dtype=torch.bool),
                                  generator=torch.Generator().manual_seed(5), guidance_scale=3.0)
    assert torch.equal(nothing_kept, plain)
    everything_kept = prior.generate(text, init_codes=init, keep_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    assert torch.equal(everything_kept, init)
    with pytest.raises(ValueError, match="keep_mask needs"):
        prior.generate(text, init_codes=init, keep_mask=torch.ones(2, 3, 3, dtype=torch.bool))


def test_a_negative_prompt_is_the_unconditional_branch_of_guidance(prior: PriorModel) -> None:
    """The first guided code's logits computed by hand from two separate forwards (caption, negative caption)."""
    text, negative = captions(2), captions(2)
    with torch.no_grad():
        conditional = prior(prior.build_input_ids(text), compute_loss=False).logits[:, -1, 40:]
        unconditional = prior(prior.build_input_ids(negative), compute_loss=False).logits[:, -1, 40:]
    expected_first = classifier_free_guidance(conditional, unconditional, 3.0, plausibility=0.1).argmax(-1)
    codes = prior.generate(text, negative_text_ids=negative, guidance_scale=3.0, do_sample=False,
                           mixed_precision="no")
    assert torch.equal(codes[:, 0, 0], expected_first)
    assert torch.equal(codes, reference_codes(prior, text, 3.0, negative=negative))
    sampled = prior.generate(text, negative_text_ids=negative, guidance_scale=3.0, mixed_precision="no",
                             generator=torch.Generator().manual_seed(2))
    assert torch.equal(sampled, reference_codes(prior, text, 3.0, torch.Generator().manual_seed(2), negative=negative))
    assert not torch.equal(codes, prior.generate(text, guidance_scale=3.0, do_sample=False, mixed_precision="no"))


def test_code_log_likelihoods_are_the_next_code_log_probabilities(prior: PriorModel) -> None:
    text, codes = captions(2), torch.randint(0, 16, (2, 4, 4))
    log_likelihoods = prior.code_log_likelihoods(text, codes)
    with torch.no_grad():
        prefix = torch.cat([prior.build_input_ids(text), codes.flatten(1)[:, :5] + 40], dim=1)
        expected = prior(prefix, compute_loss=False).logits[:, -1, 40:].log_softmax(-1)
    torch.testing.assert_close(log_likelihoods[:, 1, 1], expected.gather(1, codes[:, 1, 1:2]).squeeze(1))
    assert log_likelihoods.shape == (2, 4, 4) and (log_likelihoods <= 0).all()


def test_loss_weights_text_and_image_and_ignores_padding() -> None:
    model = PriorModel(tiny_prior_config(image_loss_weight=0.75, text_loss_weight=0.25))
    text = torch.tensor([[5, 6, 2, 0, 0, 0]])  # "x y" <eos> <pad> <pad> <pad>
    output = model(model.build_input_ids(text, torch.randint(0, 16, (1, 4, 4))))
    assert output.loss.item() == pytest.approx(0.25 * output.text_loss.item() + 0.75 * output.image_loss.item())
    # the text loss covers the three real targets ("x", "y", <eos>) and no padding
    manual = torch.nn.functional.cross_entropy(output.logits[0, :3], text[0, :3])
    assert output.text_loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_training_losses_without_logits_match_the_joint_vocabulary_losses() -> None:
    """`return_logits=False` (training) scores each position against its own vocabulary only: same losses
    and same gradients as the cross-entropy of the restricted joint-vocabulary logits."""
    torch.manual_seed(0)
    model = PriorModel(tiny_prior_config())
    input_ids = model.build_input_ids(captions(3), torch.randint(0, 16, (3, 4, 4)))
    full = model(input_ids)
    targets, predictions = input_ids[:, 1:], full.logits[:, :-1]
    split = model.config.text_len
    text_targets = targets[:, :split].masked_fill(targets[:, :split] == model.config.pad_token_id, -100)
    expected_text = F.cross_entropy(predictions[:, :split].flatten(0, 1), text_targets.flatten(), ignore_index=-100)
    expected_image = F.cross_entropy(predictions[:, split:].flatten(0, 1), targets[:, split:].flatten())
    (expected_text + expected_image).backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    lean = model(input_ids, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.text_loss, expected_text)
    torch.testing.assert_close(lean.image_loss, expected_image)
    torch.testing.assert_close(lean.loss, full.loss)
    (lean.text_loss + lean.image_loss).backward()
    for expected, parameter in zip(expected_grads, model.parameters()):
        torch.testing.assert_close(parameter.grad, expected)


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
    assert torch.equal(model.generate(text, do_sample=False), codes)  # bf16 where the CPU has it, else fp32
    for precision in ("no", "bf16"):
        assert torch.equal(model.generate(text, do_sample=False, mixed_precision=precision), codes), precision
        with torch.autocast("cpu", dtype=torch.bfloat16):  # inside a caller's autocast too
            assert torch.equal(model.generate(text, do_sample=False, mixed_precision=precision), codes), precision


def test_bf16_keeps_the_next_code_distributions_and_seeded_determinism(prior: PriorModel) -> None:
    """bf16 autocast moves the next-code distributions of a (random) prior by much less than sampling noise,
    and bf16 sampling is as reproducible under a seed as fp32."""
    text, codes = captions(8), torch.randint(0, 16, (8, 4, 4))
    input_ids = prior.build_input_ids(text, codes)
    with torch.no_grad():
        fp32 = prior(input_ids, compute_loss=False).logits[:, prior.image_start - 1 : -1, 40:].log_softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = prior(input_ids, compute_loss=False).logits[:, prior.image_start - 1 : -1, 40:].log_softmax(-1)
    assert (fp32.exp() * (fp32 - bf16)).sum(-1).max() < 1e-3  # KL(fp32 || bf16) per position, in nats
    seeded = [prior.generate(text, mixed_precision="bf16", generator=torch.Generator().manual_seed(5)) for _ in "ab"]
    assert torch.equal(*seeded)
    with pytest.raises(ValueError, match="mixed_precision must be 'auto', 'no' or 'bf16', got 'fp16'"):
        prior.generate(text, mixed_precision="fp16")


def test_compiled_sampling_step_draws_the_eager_codes_and_compiles_once_per_shape(prior: PriorModel) -> None:
    """`generate(compile=True)` (inductor) traces one graph for all one-token steps of a batch shape, draws
    the eager loop's codes (fp32), and weights frozen into a graph are never stale: a copy of the model with
    other weights, or the model after an in-place change, runs its own weights."""
    from torch._dynamo.utils import counters

    text = captions(3)
    seeded = dict(mixed_precision="no", top_k=8)
    eager = [prior.generate(text, guidance_scale=g, generator=torch.Generator().manual_seed(1), **seeded)
             for g in (1.0, 2.0)]
    torch._dynamo.reset()
    counters.clear()
    try:
        assert torch.equal(prior.generate(text, generator=torch.Generator().manual_seed(1), compile=True, **seeded),
                           eager[0])
        assert counters["stats"]["unique_graphs"] == 1, "one graph for every step: no recompile per position"
        assert torch.equal(prior.generate(text, generator=torch.Generator().manual_seed(1), compile=True, **seeded),
                           eager[0])
        assert counters["stats"]["unique_graphs"] == 1
        guided = prior.generate(text, guidance_scale=2.0, generator=torch.Generator().manual_seed(1), compile=True,
                                **seeded)
        assert torch.equal(guided, eager[1])
        other = copy.deepcopy(prior)
        with torch.no_grad():
            other.lm_head.weight[40:48] += 5.0  # this copy prefers codes 0-7
        drawn = other.generate(text, generator=torch.Generator().manual_seed(1), compile=True, **seeded)
        assert torch.equal(drawn, other.generate(text, generator=torch.Generator().manual_seed(1), compile=False,
                                                 **seeded))
        assert not torch.equal(drawn, eager[0])
        assert counters["stats"]["unique_graphs"] == 3, "the copy's weights are frozen into a graph of their own"
        with torch.no_grad():
            prior.lm_head.weight[48:56] += 5.0  # changed in place: the frozen graph must not run the old weights
        changed = prior.generate(text, generator=torch.Generator().manual_seed(1), compile=True, **seeded)
        assert torch.equal(changed, prior.generate(text, generator=torch.Generator().manual_seed(1), compile=False,
                                                   **seeded))
        assert not torch.equal(changed, eager[0]) and counters["stats"]["unique_graphs"] == 4
        with pytest.raises(ValueError, match="compile=True .* needs use_cache=True"):
            prior.generate(text, compile=True, use_cache=False)
    finally:
        torch._dynamo.reset()


def test_auto_compile_switches_after_eager_time_and_falls_back_when_compiling_fails(prior: PriorModel) -> None:
    """`compile="auto"`: a setting samples eagerly until it has spent `after_seconds`, then compiled (fp32: the
    same codes); `compile=False` never compiles; a compile that fails (no C++ compiler) warns and samples
    eagerly under `auto`, and raises under `compile=True`."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    text, seeded = captions(3), dict(mixed_precision="no", top_k=8)
    expected = prior.generate(text, generator=torch.Generator().manual_seed(1), compile=False, **seeded)
    assert not prior.auto_compile.eager_seconds, "compile=False does not count towards auto"
    torch._dynamo.reset()
    counters.clear()
    try:
        prior.auto_compile.after_seconds = 1e-9  # compile once a setting has sampled at all
        assert torch.equal(prior.generate(text, generator=torch.Generator().manual_seed(1), **seeded), expected)
        assert counters["stats"]["unique_graphs"] == 0 and len(prior.auto_compile.eager_seconds) == 1
        assert torch.equal(prior.generate(text, generator=torch.Generator().manual_seed(1), **seeded), expected)
        assert counters["stats"]["unique_graphs"] == 1, "the second call of the setting runs the compiled step"
        other_setting = prior.generate(text, generator=torch.Generator().manual_seed(1), mixed_precision="no")
        assert counters["stats"]["unique_graphs"] == 1, "another setting (top_k) starts eager"
        assert other_setting.shape == expected.shape

        torch._dynamo.reset()
        fresh = copy.deepcopy(prior)
        fresh.auto_compile = type(prior.auto_compile)(after_seconds=0.0)
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
            with pytest.warns(RuntimeWarning, match="compiling the sampling step failed, sampling eagerly instead"):
                drawn = fresh.generate(text, generator=torch.Generator().manual_seed(1), **seeded)
            assert torch.equal(drawn, expected) and len(fresh.auto_compile.failed) == 1
            assert torch.equal(fresh.generate(text, generator=torch.Generator().manual_seed(1), **seeded), expected)
            torch._dynamo.reset()
            with pytest.raises(Exception, match="C\\+\\+ compiler"):
                fresh.generate(text, generator=torch.Generator().manual_seed(1), compile=True, **seeded)
        with pytest.raises(ValueError, match="compile must be True, False or 'auto', got 'yes'"):
            prior.generate(text, compile="yes")
    finally:
        torch._dynamo.reset()


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
    """The residual dropout hooks are traced by torch.compile: active in training, off in eval. The training
    forward (dropout and the loss included) is one graph: `fullgraph=True` fails on any graph break."""
    model = PriorModel(tiny_prior_config(residual_dropout=0.5, embedding_dropout=0.1))
    input_ids = model.build_input_ids(captions(2), torch.randint(0, 16, (2, 4, 4)))
    expected = model.eval()(input_ids).logits
    # dynamo's tracing without inductor's slow codegen
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(input_ids).logits, expected)
    model.train()
    output = compiled(input_ids)
    output.loss.backward()
    assert not torch.allclose(output.logits, expected) and torch.isfinite(output.loss)
    lean = compiled(input_ids, return_logits=False)  # what a training step calls
    lean.loss.backward()
    assert torch.isfinite(lean.loss)


def test_a_batch_of_empty_captions_has_zero_text_loss_and_finite_gradients() -> None:
    model = PriorModel(tiny_prior_config())
    empty = model.empty_text_ids(2, torch.device("cpu"))
    empty[:, 0] = model.config.pad_token_id  # no eos either: not one text target
    output = model(model.build_input_ids(empty, torch.randint(0, 16, (2, 4, 4))), return_logits=False)
    output.loss.backward()
    assert output.text_loss.item() == 0.0
    assert output.loss.item() == pytest.approx(model.config.image_loss_weight * output.image_loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_bits_dropout_drops_p_and_keeps_the_expectation(p: float) -> None:
    """BitsDropout drops a share p of the elements (within 5 standard deviations of a binomial draw), scales the
    rest by 1 / (1 - p), passes gradients through the same mask, draws a new mask per call from the seeded global
    generator, and is the identity in eval mode."""
    dropout = BitsDropout(p)
    x = (torch.rand(64, 89, 33) + 0.5).requires_grad_()  # an odd element count: the last 64-bit draw is cut
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    n = x.numel()
    assert abs((~kept).sum().item() - p * n) < 5 * (n * p * (1 - p)) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-4, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept / (1 - p), rtol=1e-4, atol=0)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)
    assert not torch.equal(dropout(x), y)
    assert torch.equal(dropout.eval()(x), x)
