"""Global competition in convolutional capsules: each child's E-step softmax over every parent it votes for.

Shared by the reference path (``models.capsules``) and the fast path (``models.em_fast``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a VALID convolution."""
    return (size - kernel) // stride + 1


class GlobalSoftmax:
    """Softmax of E-step logits over every parent (position, type) that each child votes for.

    Children sit on an (H, W) grid of B types; parents on the (Ho, Wo) grid of a K x K, stride-s VALID
    convolution, C types. Logits have the logical shape (N, L=Ho*Wo, K*K*B, C) with child slot
    i = k*B + b (k = kh*K + kw); any memory layout works. Per-child sums are a fold (scatter-add to the
    child grid) followed by an unfold (gather back), the stabilising per-child max a loop over the K*K
    offsets. A child no parent reaches takes no part.
    """

    def __init__(self, in_hw: tuple[int, int], kernel: int, stride: int):
        self.in_hw, self.kernel, self.stride = in_hw, kernel, stride
        self.out_hw = tuple(conv_out_size(s, kernel, stride) for s in in_hw)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, KK, B) per-slot values -> (N, B, H, W) sums over the slots of each child."""
        N, L, KK, B = x.shape
        cols = x.permute(0, 3, 2, 1).reshape(N, B * KK, L)  # fold wants (N, B·KK, L), B-major
        return F.fold(cols, self.in_hw, self.kernel, stride=self.stride)

    def _unfold(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, B, H, W) per-child values -> (N, L, KK, B) at every slot the child occupies."""
        N, B = grid.shape[:2]
        cols = F.unfold(grid, self.kernel, stride=self.stride)  # (N, B·KK, L)
        return cols.view(N, B, self.kernel**2, -1).permute(0, 3, 2, 1)

    def _child_max(self, m: torch.Tensor) -> torch.Tensor:
        """(N, L, KK, B) -> (N, B, H, W): the max over the slots of each child (-inf if none)."""
        N, L, KK, B = m.shape
        (Ho, Wo), (K, s) = self.out_hw, (self.kernel, self.stride)
        m = m.view(N, Ho, Wo, KK, B)
        out = m.new_full((N, B, *self.in_hw), float("-inf"))
        for k in range(KK):
            kh, kw = divmod(k, K)
            rows, cols = slice(kh, kh + s * (Ho - 1) + 1, s), slice(kw, kw + s * (Wo - 1) + 1, s)
            out[:, :, rows, cols] = torch.maximum(out[:, :, rows, cols], m[:, :, :, k].permute(0, 3, 1, 2))
        return out

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        N, L, I, C = logits.shape
        KK = self.kernel**2
        x = logits.unflatten(2, (KK, I // KK))  # (N, L, KK, B, C)
        shift = self._unfold(self._child_max(x.detach().amax(dim=-1)))  # (N, L, KK, B), per-child max
        e = torch.exp(x - shift[..., None])  # (N, L, KK, B, C), every value <= 1
        total = self._unfold(self._fold(e.sum(dim=-1)))  # (N, L, KK, B): sum over all the child's parents
        return (e / total[..., None]).flatten(2, 3)  # (N, L, I, C)

    def backward(self, R: torch.Tensor, dR: torch.Tensor) -> torch.Tensor:
        """d logits from dR for R = self(logits), both (N, L, I, C): R (dR - sum over each child's parents
        of R dR)."""
        N, L, I, C = R.shape
        RdR = R * dR
        per_slot = RdR.sum(dim=-1).reshape(N, L, self.kernel**2, -1)  # (N, L, KK, B)
        per_child = self._unfold(self._fold(per_slot)).flatten(2, 3)  # (N, L, I)
        return RdR.sub_(R * per_child[..., None])
