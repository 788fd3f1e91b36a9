import torch

from deepnoise import augment


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_dihedral_group_is_eight_distinct_views():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [augment.dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for quarter_turns in range(4):
        rotated = torch.rot90(x, quarter_turns, dims=(-2, -1))
        assert any(torch.equal(v, rotated) for v in views)


def test_random_dihedral_gives_dihedral_views_per_sample():
    x = torch.rand(64, 6, 8, 8)
    y = augment.random_dihedral(x, _gen())
    seen = set()
    for i in range(64):
        ks = [k for k in range(8) if torch.equal(y[i], augment.dihedral(x[i], k))]
        assert ks, "each output is a dihedral transform of its input"
        seen.add(ks[0])
    assert len(seen) == 8


def test_crop_shape_identity_and_constant_images():
    x = torch.rand(4, 6, 32, 32)
    full = augment.random_resized_crop(x, 32, _gen(), scale=(1.0, 1.0))
    torch.testing.assert_close(full, x, atol=1e-5, rtol=0)
    small = augment.random_resized_crop(x, 16, _gen(), scale=(0.3, 0.6))
    assert small.shape == (4, 6, 16, 16)
    const = torch.full((3, 6, 32, 32), 2.5)
    torch.testing.assert_close(
        augment.random_resized_crop(const, 24, _gen()), torch.full((3, 6, 24, 24), 2.5)
    )


def test_random_erasing():
    x = torch.ones(200, 6, 20, 20)
    assert torch.equal(augment.random_erasing(x, _gen(), p=0.0), x)
    y = augment.random_erasing(x, _gen(), p=1.0, area=(0.05, 0.2))
    erased = (y == 0).all(dim=1).float().mean(dim=(1, 2))
    assert (erased > 0).all() and (erased < 0.45).all()
    assert ((y == 0) == (y[:, :1] == 0)).all(), "all channels of a pixel erased together"


def test_augment_batch_is_reproducible_and_sized():
    x = torch.rand(8, 6, 40, 40)
    a = augment.augment_batch(x, _gen(3), 32, erase_p=0.5)
    b = augment.augment_batch(x, _gen(3), 32, erase_p=0.5)
    assert a.shape == (8, 6, 32, 32) and torch.equal(a, b)
    c = augment.augment_batch(x, _gen(4), 32, erase_p=0.5)
    assert not torch.equal(a, c)
    assert augment.augment_batch(x, _gen(), 40, flips=False, crop_scale=None).equal(x)
