"""The output head and its cross-entropy in one step, a chunk of rows at a time.

The one idea: in a small model the largest tensor of a training step is not in the blocks but
at the end, the logits: ``rows x vocab_size`` numbers (8 sequences of 128 tokens against
GPT-2's 50,257 entries: 206 MB in float32). The usual path writes them (the head), reads and
writes them again (log-softmax), fills a tensor as large with zeros for the loss's gradient and
reads both back in backward. Here the tensor never exists whole: a chunk of rows gets its
logits, turns them into probabilities in place and then into its gradient, and is gone.

That works because the gradient of the cross-entropy is known in closed form,

    d loss / d logits = softmax(logits) - one_hot(target)     (per row, before the mean)

so the forward pass computes it while the chunk is at hand, and with it the gradients of the
head's input and weight (two products). Backward only scales them by the gradient that arrives
and by 1 / (number of scored targets), the mean. Rows whose target is ignored (a prompt, padding)
never reach the head at all. The results equal
``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` up to the order of float additions.
"""

from __future__ import annotations

from typing import Any

import torch

from minigpt.runtime.linear import input_gradient, linear, weight_gradient


def chunk_rows_for(weight: torch.Tensor) -> int:
    """Rows per chunk: as many as the head's input has features, so one chunk's logits
    ``(chunk, vocab)`` are as large as the weight ``(vocab, emb_dim)``. Adding each chunk's
    weight gradient into the total then costs one more pass over memory the size of the
    chunk's logits: larger chunks save little more, smaller ones pay that pass more often."""
    return weight.shape[1]


def _summed(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            chunk_rows: int, want_grad: bool) -> tuple[torch.Tensor, ...]:
    """``(summed loss, scored targets, summed gradient for hidden, for weight)``, float32; the
    gradients are None unless ``want_grad``. Shapes in :func:`head_cross_entropy`."""
    device = hidden.device.type
    # The products run in autocast's dtype where it is on, as F.linear's would; the softmax in float32.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    # Only rows with a scored target reach the head: a prompt's or padding's logits would be computed
    # just to be thrown away (instruction tuning scores the answers alone).
    scored = (targets != ignore_index).nonzero().squeeze(1)  # (scored,) row indices
    h = hidden.detach()[scored].to(dtype)  # (scored, emb_dim)
    w = weight.detach().to(dtype)  # cast once here, not once a chunk
    ids = targets[scored][:, None]  # (scored, 1)
    grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if want_grad else None
    grad_weight = None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.no_grad(), torch.autocast(device, enabled=False):
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            log_probs = torch.log_softmax(linear(h[rows], w).float(), dim=-1)  # (chunk, vocab)
            total -= log_probs.gather(1, ids[rows]).sum()
            if not want_grad:
                continue
            # softmax - one_hot(target), in place: the chunk's logits become their gradient.
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, ids[rows], grad_logits.new_full(ids[rows].shape, -1.0))
            grad_logits = grad_logits.to(dtype)
            grad_h[rows] = input_gradient(grad_logits, w)  # (chunk, vocab) @ (vocab, emb_dim)
            chunk_grad_weight = weight_gradient(grad_logits, h[rows])  # (vocab, emb_dim), in dtype
            if grad_weight is None:
                grad_weight = chunk_grad_weight.float()
            else:
                grad_weight.add_(chunk_grad_weight)  # float32 += dtype: the cast and the sum in one pass
    grad_hidden = None
    if want_grad:
        # Unscored rows get exactly zero, as they do from F.cross_entropy.
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=h.device).index_copy_(0, scored, grad_h)
        if grad_weight is None:  # nothing scored
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        # The kernel may hand back the transpose of a (emb_dim, vocab) product; laid out as the weight
        # is, the gradient adds into its .grad (a tied embedding's included) without reading across rows.
        grad_weight = grad_weight.contiguous()
    count = torch.tensor(len(scored), device=h.device)
    return total, count, grad_hidden, grad_weight


class _HeadCrossEntropy(torch.autograd.Function):
    """Forward: the mean loss, its gradients computed on the way and kept; backward: those
    gradients scaled by what arrives."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int) -> torch.Tensor:
        total, count, grad_hidden, grad_weight = _summed(hidden, weight, targets, ignore_index, chunk_rows, True)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # d(mean)/d(sum), times what arrives from above. With nothing scored the sums are zero, and
        # so are the gradients (as F.cross_entropy's), though the loss itself is NaN.
        scale = grad_loss / count.clamp(min=1)
        grad_h = (grad_hidden * scale).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_weight * scale).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    ignore_index: int = -100, chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of a bias-free output head, without the whole logits tensor.

    ``hidden (rows, emb_dim)`` (the final norm's output), ``weight (vocab, emb_dim)`` (the
    head's), ``targets (rows,)`` ids -> a float32 scalar, equal to
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)``
    with the same gradients (up to float rounding) and a peak of one chunk's logits
    (``chunk_rows`` rows; default :func:`chunk_rows_for`).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.dim() != 2 or \
            hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"head_cross_entropy takes hidden (rows, emb_dim), weight (vocab, emb_dim) and targets (rows,); "
            f"got {tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    rows = chunk_rows or chunk_rows_for(weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadCrossEntropy.apply(hidden, weight, targets, ignore_index, rows)
    # Nothing to differentiate (evaluation): the chunked loss alone.
    total, count, _, _ = _summed(hidden, weight, targets, ignore_index, rows, want_grad=False)
    # The mean over scored targets; none scored gives 0 / 0 = NaN, as F.cross_entropy does.
    return total / count
