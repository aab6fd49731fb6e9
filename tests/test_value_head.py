import pytest
import torch

from lit_diffac.value_heads import ValueHead, sinusoidal_embedding


def _inputs(batch=3):
    torch.manual_seed(0)
    maps = [torch.randn(batch, 16, 8, 8), torch.randn(batch, 8, 4, 4)]
    return maps, torch.rand(batch), torch.randn(batch, 12)


def test_shapes_maps_and_tokens():
    maps, t, pooled = _inputs()
    head = ValueHead([16, 8], text_dim=12, num_outputs=3, dim=32)
    assert head(maps, t, pooled).shape == (3, 3)
    tokens = [torch.randn(3, 20, 16)]
    assert ValueHead([16], text_dim=12, dim=32)(tokens, t, pooled).shape == (3, 1)


def test_fresh_branches_ignore_features_until_gates_open():
    """AdaLN-Zero: zero-initialised gates make a fresh head independent of the features."""
    maps, t, pooled = _inputs()
    head = ValueHead([16, 8], text_dim=12, dim=32)
    other = [m + 5 * torch.randn_like(m) for m in maps]
    assert torch.allclose(head(maps, t, pooled), head(other, t, pooled))


def _open_gates(head):
    for branch in head.branches:
        torch.nn.init.normal_(branch.ada[1].weight, std=0.5)
        torch.nn.init.normal_(branch.ada[1].bias, std=0.5)
    return head


@pytest.mark.parametrize("option, changes", [("timestep_conditioning", "t"), ("text_conditioning", "pooled")])
def test_conditioning_options(option, changes):
    maps, t, pooled = _inputs()
    torch.manual_seed(1)
    head = _open_gates(ValueHead([16, 8], text_dim=12, dim=32))
    head_off = _open_gates(ValueHead([16, 8], text_dim=12, dim=32, **{option: False}))
    t2, pooled2 = (torch.rand(3), pooled) if changes == "t" else (t, torch.randn(3, 12))
    assert not torch.allclose(head(maps, t, pooled), head(maps, t2, pooled2))
    assert torch.allclose(head_off(maps, t, pooled), head_off(maps, t2, pooled2))


def test_features_matter_and_detach_option():
    maps, t, pooled = _inputs()
    head = _open_gates(ValueHead([16, 8], text_dim=12, dim=32))
    maps = [m.requires_grad_() for m in maps]
    assert not torch.allclose(head(maps, t, pooled), head([m * 2 for m in maps], t, pooled))
    head(maps, t, pooled).sum().backward()
    assert all(m.grad is None for m in maps)  # detached by default
    head.detach_features = False
    head(maps, t, pooled).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)


def test_patch_size_pools_maps_and_token_grids():
    head = ValueHead([16], text_dim=4, patch_size=2)
    assert head.tokens(head.compress(torch.randn(2, 16, 8, 8))).shape == (2, 16, 16)
    # DiT image tokens [B, h·w, C] on a 4x6 grid: the same pooling as the map they flatten (row-major)
    maps = torch.randn(2, 16, 4, 6)
    tokens = maps.flatten(2).transpose(1, 2)
    with pytest.raises(ValueError, match="needs their grid"):
        head.compress(tokens)
    head.token_grid = (6, 4)
    with pytest.raises(ValueError, match="needs their grid"):  # rows and columns matter, not only the count
        head.compress(tokens[:, :20])
    head.token_grid = (4, 6)
    expected = torch.nn.functional.avg_pool2d(maps, 2).flatten(2).transpose(1, 2)
    assert torch.equal(head.compress(tokens), expected) and expected.shape == (2, 6, 16)
    assert head.compress(tokens.bfloat16()).dtype == torch.float32  # pooled in fp32
    head.patch_size = 1
    assert head.compress(tokens) is tokens  # no pooling: the feature itself


@pytest.mark.parametrize("shape", [(3, 8, 4, 4), (3, 16, 8)], ids=["maps", "tokens"])
def test_reading_compressed_features_is_reading_the_features(shape):
    head = _open_gates(ValueHead([8], text_dim=12, dim=32, patch_size=2))
    head.token_grid = (4, 4)
    feature = torch.randn(*shape)
    t, pooled = torch.rand(3), torch.randn(3, 12)
    assert torch.equal(head([feature], t, pooled), head([head.compress(feature)], t, pooled, compressed=True))
    assert not torch.allclose(head([feature], t, pooled), head([feature[..., :2, :2] if len(shape) == 4 else
                                                                 feature[:, :4]], t, pooled, compressed=True))


def test_validation_messages():
    with pytest.raises(ValueError, match="at least one feature tap"):
        ValueHead([], text_dim=4)
    with pytest.raises(ValueError, match="divisible"):
        ValueHead([8], text_dim=4, dim=30, num_heads=4)
    with pytest.raises(ValueError, match="built for 1 taps"):
        ValueHead([8], text_dim=4)([torch.randn(1, 4, 8), torch.randn(1, 4, 8)], torch.rand(1), torch.randn(1, 4))


def test_sinusoidal_embedding_distinguishes_times():
    emb = sinusoidal_embedding(torch.tensor([0.1, 0.5, 0.9]), 32)
    assert emb.shape == (3, 32)
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 0.1


@pytest.mark.parametrize("option", [{"num_queries": 3}, {"token_layers": 1}, {"dim": 48}, {"hidden": 32}])
def test_capacity_options_change_the_head(option):
    maps, t, pooled = _inputs()
    torch.manual_seed(2)
    base = _open_gates(ValueHead([16, 8], text_dim=12, dim=32))
    torch.manual_seed(2)
    other = _open_gates(ValueHead([16, 8], text_dim=12, **{"dim": 32, **option}))
    assert sum(p.numel() for p in base.parameters()) != sum(p.numel() for p in other.parameters())
    assert other(maps, t, pooled).shape == (3, 1)
    assert not torch.allclose(base(maps, t, pooled), other(maps, t, pooled))


def _textbook_read(branch, h, tokens):
    """Multi-head attention as usually written: RMSNorm-ed queries and keys per head, every token projected to a
    value, scaled dot-product attention (the reference for ``ValueBranch._read``)."""
    import torch.nn.functional as F

    b, heads = tokens.shape[0], branch.num_heads

    def split(x):
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    q, k = branch.q_norm(split(branch.to_q(h))), branch.k_norm(split(branch.to_k(tokens)))
    out = F.scaled_dot_product_attention(q, k, split(branch.to_v(tokens)))
    return out.transpose(1, 2).reshape(b, h.shape[1], -1)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_attention_read_equals_the_textbook_attention(num_queries):
    """The read never materialises normalised keys or projected values; it must still be the same attention."""
    from lit_diffac.value_heads.head import ValueBranch

    torch.manual_seed(0)
    branch = ValueBranch(in_dim=24, dim=32, cond_dim=8, num_heads=4, num_queries=num_queries)
    for norm in (branch.q_norm, branch.k_norm):  # non-trivial gains
        torch.nn.init.normal_(norm.weight, mean=1.0, std=0.5)
    h, tokens = torch.randn(5, num_queries, 32, requires_grad=True), torch.randn(5, 40, 32, requires_grad=True)
    ours, reference = branch._read(h, tokens), _textbook_read(branch, h, tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), [h, tokens, *branch.parameters()], allow_unused=True)
    expected = torch.autograd.grad(reference.square().sum(), [h, tokens, *branch.parameters()], allow_unused=True)
    for g, e in zip(grads, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
