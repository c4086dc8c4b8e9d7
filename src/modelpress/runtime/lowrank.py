"""Factorized layers: one big layer as a chain of thin ones with fewer parameters and FLOPs."""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """W ~ second.weight @ first.weight: `in -> rank -> out`, the bias on the second layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class TuckerConv2d(nn.Module):
    """Tucker-2 factorized Conv2d: 1x1 conv to `rank_in` channels, the k x k core to `rank_out`,
    1x1 conv to `out_channels` (with the bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank_in: int,
                 rank_out: int, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank_in, self.rank_out = in_channels, out_channels, rank_in, rank_out
        self.kernel_size, self.stride, self.padding, self.dilation = (tuple(kernel_size), tuple(stride),
                                                                      tuple(padding), tuple(dilation))
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(rank_in, rank_out, self.kernel_size, self.stride, self.padding, self.dilation,
                              bias=False)
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))
