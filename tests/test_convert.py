"""MHA -> GQA/MQA conversion: K/V heads of a group mean-pooled; shapes of the converted projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subquad import attention
from subquad.nn.convert import mha_to_gqa, pool_kv_heads


class _MHA(nn.Module):
    def __init__(self, d=32, n_heads=8, head_dim=4):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_heads, head_dim
        self.q_proj = nn.Linear(d, n_heads * head_dim)
        self.k_proj = nn.Linear(d, n_heads * head_dim)
        self.v_proj = nn.Linear(d, n_heads * head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        return attention(q, k, v, causal=True, backend="reference")


def test_pooled_heads_are_group_means():
    w, bias = torch.randn(8 * 4, 16), torch.randn(8 * 4)
    pw, pb = pool_kv_heads(w, 8, 2, bias)
    assert pw.shape == (2 * 4, 16) and pb.shape == (8,)
    heads = w.view(8, 4, 16)
    torch.testing.assert_close(pw.view(2, 4, 16)[1], heads[4:8].mean(0))
    torch.testing.assert_close(pb.view(2, 4)[0], bias.view(8, 4)[:4].mean(0))
    mqa, _ = pool_kv_heads(w, 8, 1)
    torch.testing.assert_close(mqa, heads.mean(0))


@pytest.mark.parametrize("n_kv", [2, 1])
def test_module_conversion(n_kv):
    torch.manual_seed(0)
    m = _MHA()
    with torch.no_grad():  # heads identical within each group: GQA then computes exactly what MHA did
        for lin in (m.k_proj, m.v_proj):
            w = lin.weight.view(n_kv, 8 // n_kv, 4, 32)
            w.copy_(w[:, :1].expand_as(w))
            bias = lin.bias.view(n_kv, 8 // n_kv, 4)
            bias.copy_(bias[:, :1].expand_as(bias))
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        before = m(x)
        mha_to_gqa(m, n_kv)
        after = m(x)
    assert m.k_proj.weight.shape == (n_kv * 4, 32) and m.v_proj.bias.shape == (n_kv * 4,)
    assert m.q_proj.weight.shape == (8 * 4, 32) and m.n_kv_heads == n_kv
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_kv_heads"):
        pool_kv_heads(torch.randn(32, 16), 8, 3)
    with pytest.raises(ValueError, match="weight"):
        pool_kv_heads(torch.randn(30, 16), 8, 2)
    with pytest.raises(ValueError, match="n_heads"):
        mha_to_gqa(nn.Module(), 2)
