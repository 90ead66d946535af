"""The training loop every step shares: seeded batches, periodic saves, resume, prompt cancellation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.registry.shrink import Cancelled, StepContext
from controller.registry.shrink.checkpoint import load_state, save_state

log = logging.getLogger(__name__)

#: Optimizer steps between saves of the resumable state (and always on cancel and at the end).
SAVE_EVERY = 25


@dataclass
class LoopResult:
    steps: int  # optimizer steps in total
    resumed_from: int  # optimizer steps already done when this call started (0: a fresh start)
    last_loss: float


def run_loop(
    ctx: StepContext,
    *,
    name: str,
    fingerprint: dict[str, Any],
    model: Any,
    optimizer: Any,
    n_items: int,
    batch_size: int,
    epochs: int,
    loss_fn: Callable[[list[int]], Any],
    progress_from: float = 0.0,
    progress_to: float = 1.0,
    label: str = "training",
) -> LoopResult:
    """Train ``model`` for ``epochs`` over ``n_items`` in seeded random batches; ``loss_fn(indices)`` returns
    the loss of a batch. State (weights, optimizer, position) is saved in ``ctx.work_dir/name`` every
    ``SAVE_EVERY`` steps and on cancel; a call with the same fingerprint continues from it."""
    import torch

    per_epoch = max(1, -(-n_items // batch_size))
    total = per_epoch * epochs
    done = 0
    last_loss = float("nan")
    state = load_state(ctx.work_dir, name, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done = int(state["steps"])
        last_loss = float(state.get("loss", last_loss))
        log.info("%s: resuming at step %d of %d from %s", label, done, total, ctx.work_dir / name)
    resumed_from = done

    def save() -> None:
        save_state(
            ctx.work_dir,
            name,
            {
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "steps": done,
                "loss": last_loss,
            },
        )

    # Dropout stays off: a run resumed from a saved state then computes exactly what an uninterrupted one does.
    model.eval()
    while done < total:
        epoch, start = divmod(done, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(ctx.seed * 10_007 + epoch)).tolist()
        for b in range(start, per_epoch):
            if ctx.cancelled():
                save()
                raise Cancelled(f"{label} cancelled at step {done} of {total} (state saved; it resumes from there)")
            loss = loss_fn(order[b * batch_size : (b + 1) * batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            last_loss = float(loss.detach())
            if done % SAVE_EVERY == 0:
                save()
            fraction = progress_from + (progress_to - progress_from) * done / total
            ctx.progress(fraction, f"{label}: epoch {epoch + 1}/{epochs}, step {done}/{total}, loss {last_loss:.4f}")
    save()
    return LoopResult(steps=done, resumed_from=resumed_from, last_loss=last_loss)
