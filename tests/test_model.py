"""The GPT: the KV cache reproduces a full forward, the head is tied, the config is validated."""

from __future__ import annotations

import pytest
import torch

from gptedge.train.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=24, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
    m = GPT(cfg).eval()
    with torch.no_grad():  # larger than GPT-2's init so the layers do more than pass the residual through
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


@pytest.mark.parametrize(
    "splits",
    [[20], [1] * 20, [7] + [1] * 13, [5, 7, 1, 7], [1, 19], [12, 8]],
    ids=["full", "one-by-one", "prefill7-then-steps", "mixed", "1+19", "12+8"],
)
def test_cached_forward_matches_full_forward(model: GPT, splits: list[int]) -> None:
    idx = torch.randint(0, model.config.vocab_size, (2, sum(splits)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _, presents = model(idx)
        past, pos, pieces = None, 0, []
        for s in splits:
            logits, _, past = model(idx[:, pos : pos + s], past_kv=past)
            pieces.append(logits)
            pos += s
    cached = torch.cat(pieces, dim=1)
    assert cached.shape == full.shape == (2, 20, 97)
    assert (cached - full).abs().max().item() <= 1e-5
    assert full.abs().max().item() > 1.0  # the comparison is between non-trivial logits
    # The cache holds every position: [B, H, T, D] per layer, equal to the full pass's.
    assert len(past) == 2 and past[0][0].shape == (2, 4, 20, 8)
    assert (past[1][1] - presents[1][1]).abs().max().item() <= 1e-5


def test_mask_alignment_matters(model: GPT) -> None:
    """A top-left causal mask with a past (the classic bug) would change the logits; ours must not."""
    idx = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _, _ = model(idx)
        _, _, past = model(idx[:, :6])
        step, _, _ = model(idx[:, 6:], past_kv=past)
    assert torch.allclose(step, full[:, 6:], atol=1e-5)


def test_greedy_generation_matches_uncached_argmax(model: GPT) -> None:
    idx = torch.tensor([[3, 14, 15, 92]])
    out = model.generate_greedy(idx, max_new_tokens=6)
    seq = idx
    with torch.no_grad():
        for _ in range(6):
            logits, _, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_lm_head_is_tied_to_the_embedding() -> None:
    m = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    assert m.lm_head.weight is m.transformer.wte.weight
    names = [n for n, _ in m.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # one parameter, listed once
    _, loss, _ = m(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    loss.backward()
    torch.optim.SGD(m.parameters(), lr=1.0).step()
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()


def test_param_count_matches_the_formula() -> None:
    V, T, L, C = 50, 8, 3, 16
    for bias in (True, False):
        m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=4, n_embd=C, bias=bias))
        b = 1 if bias else 0
        per_layer = (
            2 * (C + b * C)  # ln_1, ln_2
            + C * 3 * C + b * 3 * C  # c_attn
            + C * C + b * C  # attn c_proj
            + C * 4 * C + b * 4 * C  # c_fc
            + 4 * C * C + b * C  # mlp c_proj
        )
        total = V * C + T * C + L * per_layer + (C + b * C)  # wte (shared with lm_head), wpe, blocks, ln_f
        assert m.num_params(non_embedding=False) == total
        assert m.num_params() == total - T * C


def test_loss_ignores_minus_100_targets() -> None:
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=16))
    x = torch.tensor([[1, 2, 3, 4]])
    logits, _, _ = m(x)
    _, loss, _ = m(x, torch.tensor([[-100, -100, 7, 9]]))
    expected = torch.nn.functional.cross_entropy(logits[0, 2:], torch.tensor([7, 9]))
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(gelu_approximate="fast"), "gelu_approximate"),
        (dict(block_size=0), "block_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_sequence_longer_than_block_size_is_refused() -> None:
    m = GPT(GPTConfig(block_size=4, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="exceeds the model.s context 4"):
        m(torch.zeros(1, 5, dtype=torch.long))
    _, _, past = m(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model.s context 4"):
        m(torch.zeros(1, 2, dtype=torch.long), past_kv=past)


def test_config_dict_round_trip_ignores_unknown_keys() -> None:
    cfg = GPTConfig(block_size=16, vocab_size=33, n_layer=2, n_head=2, n_embd=8, bias=False)
    assert GPTConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg
    assert cfg.head_dim == 4
