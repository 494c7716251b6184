"""Memory bank eviction policies and cross-attention recall."""

import torch

from hiermem.memory.bank import AttentionEviction, FIFOEviction, MemoryBank, append
from hiermem.memory.recall import CrossAttentionRecall


def _filled(policy, n=3, batch=2):
    bank = MemoryBank.empty(batch, 4)
    for s in range(n):
        bank, evicted = append(bank, torch.full((batch, 1, 4), float(s)), s, n, policy)
        assert evicted is None
    return bank


def test_fifo_evicts_oldest():
    policy = FIFOEviction()
    bank, evicted = append(_filled(policy), torch.full((2, 1, 4), 9.0), 3, 3, policy)
    assert evicted.tolist() == [0, 0]
    assert bank.sources.tolist() == [[1, 2, 3]] * 2
    assert bank.embeddings[:, :, 0].tolist() == [[1.0, 2.0, 9.0]] * 2


def test_attention_evicts_least_attended_per_row():
    policy = AttentionEviction(decay=0.5)
    bank = _filled(policy)
    # row 0 keeps attending slot 0, row 1 slot 2: each row evicts a different, rarely used slot
    weights = torch.tensor([[0.8, 0.05, 0.15], [0.1, 0.3, 0.6]])
    for _ in range(3):
        bank = policy.observe(bank, weights)
    bank, evicted = append(bank, torch.full((2, 1, 4), 9.0), 3, 3, policy)
    assert evicted.tolist() == [1, 0]
    assert bank.sources.tolist() == [[0, 2, 3], [1, 2, 3]]
    torch.testing.assert_close(bank.usage[:, -1], bank.usage[:, :2].mean(1))  # new slot: mean of the others


def test_attention_ties_fall_back_to_oldest():
    policy = AttentionEviction()
    bank, evicted = append(_filled(policy), torch.zeros(2, 1, 4), 3, 3, policy)
    assert evicted.tolist() == [0, 0]


def test_recall_is_convex_combination_of_bank():
    torch.manual_seed(0)
    recall = CrossAttentionRecall(8, 4)
    bank = torch.randn(3, 5, 8)
    out, weights = recall(torch.randn(3, 1, 8), bank)
    assert out.shape == (3, 1, 8) and weights.shape == (3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(out, (weights[:, None] @ bank))


def test_recall_weights_are_scaled_dot_product_attention():
    """weights = softmax((S Wq)(M Wk)^T / sqrt(h)), written out by hand, for every row and slot."""
    torch.manual_seed(1)
    d, h = 8, 4
    recall = CrossAttentionRecall(d, h)
    summary, bank = torch.randn(3, 1, d, dtype=torch.float64), torch.randn(3, 5, d, dtype=torch.float64)
    recall = recall.double()
    wq, wk = recall.query.weight, recall.key.weight  # (h, d)
    _, weights = recall(summary, bank)
    for b in range(3):
        q = wq @ summary[b, 0]  # (h,)
        scores = torch.stack([q @ (wk @ bank[b, j]) for j in range(5)]) / h ** 0.5
        expected = scores.exp() / scores.exp().sum()
        torch.testing.assert_close(weights[b], expected, rtol=1e-6, atol=1e-7)  # softmax runs in float32
    assert not torch.allclose(weights, torch.full_like(weights, 0.2))  # not uniform: the scores matter
