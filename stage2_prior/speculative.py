"""Speculative Jacobi decoding (SJD): image codes drawn several per forward pass, from the distribution sequential
sampling draws them from (Teng et al., 2024, "Accelerating Auto-regressive Text-to-Image Generation with
Training-free Speculative Jacobi Decoding"). `PriorModel.generate(decoding="jacobi")` runs it on its cached
decoder; this module holds the loop, given the prior's next-code distributions and a noise source.

Each image holds drafts for the codes after those it has committed. A pass feeds a window of `window` codes
through the decoder: the last committed code and the drafts after it. The logits after each give p, the guided
and warped distribution of the next code (as the sequential step computes it), for every code of the window at
once. Walking the window, a draft x drawn from q is accepted when u < p(x) / q(x), u ~ U(0, 1); the first one
rejected is drawn again from norm(max(0, p - q)) and ends the commit (when none is, the code after the window is
verified too). This is speculative sampling's rule: each committed code follows p given the codes before it,
whatever the drafts were, so the images have sequential sampling's distribution (not its codes for a seed).
The codes after the commit are drafted again from the p just computed for them (q = p); codes new to the window
from the last p computed (the first window copies the first code's distribution).

Each image (guidance's conditional and unconditional rows share its codes) commits its own number of codes per
pass and moves its own window (the decoder takes one row of positions per row); finished images run along until
the last one finishes. Every pass draws noise of the same shapes whatever the images' progress, so with one
generator per group of images (`draw_noise`), a group gets the same codes alone and in a batch. The loop runs
eagerly: no `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class DecodingStats:
    """What a `generate` call's decoding did (`prior.last_decoding_stats`): each image of the batch took
    `forward_passes` decoder calls (the prompt's included) to draw its `codes` sampled codes."""

    decoding: Literal["sequential", "jacobi"]
    forward_passes: int
    codes: int
    accepted_drafts: float  # jacobi: the codes committed as accepted drafts (the others redrawn), mean per image

    @property
    def codes_per_pass(self) -> float:
        """Codes drawn per decoder call: 1 sequentially, more where speculative decoding accepts drafts."""
        return self.codes / self.forward_passes


def speculative_jacobi_codes(
    first_probs: torch.Tensor,
    window_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: Callable[[tuple[int, ...]], torch.Tensor],
    num_codes: int,
    window: int,
    progress: bool = False,
) -> tuple[torch.Tensor, DecodingStats]:
    """Codes [B, num_codes] and what it took to draw them.

    `first_probs` [B, V]: the first code's distribution (after the prompt). `window_probs(codes, indices)`: the
    next-code distributions [B, W, V] after each of `codes` [B, W] fed at code `indices` [B, W] (each row its
    own), through a cache that keeps what was fed before. `noise(shape)`: Exp(1) noise [B, ...] (every draw;
    a code is drawn as `argmax(p / noise)`, the exponential race of `torch.multinomial`)."""
    batch, vocab = first_probs.shape
    device = first_probs.device
    window = min(window, num_codes - 1)  # codes fed at most: all but the last
    slots = torch.arange(window, device=device)
    images = torch.arange(batch, device=device)

    codes = torch.zeros(batch, num_codes, dtype=torch.long, device=device)  # committed codes, then drafts
    codes[:, 0] = (first_probs / noise((batch, vocab))).argmax(dim=-1)
    committed = torch.ones(batch, dtype=torch.long, device=device)
    start = torch.zeros_like(committed)  # the code each image's window feeds first; it targets the codes after
    draft_probs = first_probs[:, None].expand(batch, window, vocab)  # q of each target
    redraft(codes, committed, start[:, None] + 1 + slots, draft_probs, noise)
    passes, accepted = 1, torch.zeros_like(committed)
    bar = tqdm(total=num_codes, initial=1, desc="sampling image codes", unit="code", disable=not progress,
               leave=False)
    while bool((committed < num_codes).any()):
        fed = start[:, None] + slots
        probs = window_probs(codes.gather(1, fed), fed)  # [B, W, V]: p of each target
        passes += 1

        targets = fed + 1
        drafts = codes.gather(1, targets)[..., None]
        ratio = (probs.gather(-1, drafts) / draft_probs.gather(-1, drafts)).squeeze(-1)
        uniform = -torch.expm1(-noise((batch, window)))  # 1 - exp(-e) ~ U(0, 1)
        rejected = (targets >= committed[:, None]) & ~(uniform < ratio)
        first_rejected = torch.where(rejected.any(dim=1), rejected.int().argmax(dim=1), window)
        last = first_rejected.clamp(max=window - 1)  # the slot of the last code committed
        residual = (probs[images, last] - draft_probs[images, last]).clamp_min(0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs[images, last])
        redrawn = (residual / noise((batch, vocab))).argmax(dim=-1)
        is_rejected = first_rejected < window
        last_target = targets[images, last]
        codes[images, last_target] = torch.where(is_rejected, redrawn, codes[images, last_target])
        accepted += last_target + 1 - committed - is_rejected.long()
        bar.update(int((last_target + 1).min() - committed.min()))
        committed = last_target + 1

        next_start = (committed - 1).clamp(max=num_codes - 1 - window)
        covered = (next_start - start)[:, None] + slots  # the slot of this pass's p for each next target
        draft_probs = probs.gather(1, covered.clamp(max=window - 1)[..., None].expand(-1, -1, vocab))
        start = next_start
        redraft(codes, committed, start[:, None] + 1 + slots, draft_probs, noise)
    bar.close()
    stats = DecodingStats("jacobi", forward_passes=passes, codes=num_codes,
                          accepted_drafts=accepted.float().mean().item())
    return codes, stats


def redraft(
    codes: torch.Tensor, committed: torch.Tensor, targets: torch.Tensor, draft_probs: torch.Tensor,
    noise: Callable[[tuple[int, ...]], torch.Tensor],
) -> None:
    """Draw new drafts, in place, for the `targets` [B, W] of `codes` [B, N] not committed yet (the first
    `committed` [B] are), from `draft_probs` [B, W, V]."""
    drawn = (draft_probs / noise(draft_probs.shape)).argmax(dim=-1)
    codes.scatter_(1, targets, torch.where(targets >= committed[:, None], drawn, codes.gather(1, targets)))
