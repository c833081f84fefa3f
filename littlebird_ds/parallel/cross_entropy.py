"""Cross entropy over vocabulary-parallel logits, without gathering ``[N, V]``."""

from __future__ import annotations

import torch

from .mappings import _all_reduce, _size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_end, group, ignore_index):
        # logits [N, V/P] fp32, target [N] global ids.
        tp = _size(group) > 1
        lmax = logits.max(dim=-1).values  # [N]
        if tp:
            torch.distributed.all_reduce(lmax, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - lmax.unsqueeze(-1)  # stability: exp never overflows
        ignore = target == ignore_index
        t = target.masked_fill(ignore, 0)
        mine = (t >= vocab_start) & (t < vocab_end)
        local_t = (t - vocab_start).masked_fill(~mine, 0)
        picked = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)  # [N]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)  # [N]
        if tp:
            picked, sum_exp = _all_reduce(picked, group), _all_reduce(sum_exp, group)
        loss = (sum_exp.log() - picked).masked_fill(ignore, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, mine, ignore)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, mine, ignore = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d logits = softmax - onehot(target)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= mine.to(grad.dtype)
        grad.mul_((g * (~ignore).to(g.dtype)).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_end: int,
                                 group, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross entropy ``[N]`` from this rank's logits ``[N, V/P]`` for vocabulary ids
    ``[vocab_start, vocab_end)``, without gathering ``[N, V]``: max, target logit and sum of
    exponentials are all-reduced over TP. Ignored targets get loss 0 and no gradient."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_end, group, ignore_index)
