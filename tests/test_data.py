import h5py
import numpy as np
import pytest
import torch

from deepnoise import data, metadata
from deepnoise.errors import InputError


def _wells(screen):
    index = data.StackIndex.build(screen.stacks)
    return index, index.locate(data.well_table(metadata.read_sites(screen.sites)))


def test_dataset_returns_the_right_site(data_screen):
    index, wells = _wells(data_screen)
    ds = data.StackDataset(index.files, wells, wells["sirna_id"].to_numpy())
    for i in (0, 5, len(wells) - 1):
        w = wells.iloc[i]
        with h5py.File(index.files[w.file_idx]) as f:
            names = [v.decode() for v in f["well"][()]]
            sites = f["site"][()]
            rows = {int(sites[r]): r for r, n in enumerate(names) if n == w.well}
            for site_row, site in ((0, 1), (1, 2)):
                img, norm_idx, label, j = ds[(i, site_row)]
                assert torch.equal(img, torch.from_numpy(f["images"][rows[site]]))
                assert (norm_idx, label, j) == (w.file_idx, w.sirna_id, i)
            both, *_ = ds[i]
            assert both.shape[0] == 2 and torch.equal(both[1], torch.from_numpy(f["images"][rows[2]]))
        assert index.keys[w.file_idx] == (w.experiment, w.plate)


def test_normalization_uses_the_wells_plate(data_screen):
    index, wells = _wells(data_screen)
    mean, std = data.normalization_arrays(data_screen.stats, "plate", index.keys)
    ds = data.StackDataset(index.files, wells)
    img, norm_idx, _, _ = ds[(3, 0)]
    out = data.normalize_batch(img[None], torch.tensor([norm_idx]), torch.tensor(mean), torch.tensor(std))
    expect = (img.double().numpy() - mean[norm_idx][:, None, None]) / std[norm_idx][:, None, None]
    np.testing.assert_allclose(out[0].numpy(), expect, rtol=1e-5, atol=1e-5)
    # the plate's images normalise to mean 0 / std 1 per channel
    with h5py.File(index.files[norm_idx]) as f:
        allimgs = torch.from_numpy(f["images"][()])
    z = data.normalize_batch(
        allimgs, torch.full((len(allimgs),), norm_idx), torch.tensor(mean), torch.tensor(std)
    )
    np.testing.assert_allclose(z.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(dim=(0, 2, 3)).numpy(), 1, atol=1e-2)
    jit = data.normalize_batch(
        img[None], torch.tensor([norm_idx]), torch.tensor(mean), torch.tensor(std), 0.1, torch.Generator()
    )
    assert not torch.equal(jit, out)


def test_train_sampler_random_site_per_well_and_deterministic():
    s = data.EpochSampler(50, seed=1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(50))
    assert {site for _, site in first} == {0, 1}
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    parts = [list(data.EpochSampler(50, seed=1, rank=r, world=3)) for r in range(3)]
    assert sum(len(p) for p in parts) == 51  # padded to a multiple of the world size
    longer = list(data.EpochSampler(10, seed=1, total=25))
    assert len(longer) == 25 and set(i for i, _ in longer) == set(range(10))
    assert list(data.EpochSampler(5, 0, shuffle=False, random_site=False)) == [0, 1, 2, 3, 4]


def test_loader_with_workers(data_screen):
    index, wells = _wells(data_screen)
    ds = data.StackDataset(index.files, wells, wells["sirna_id"].to_numpy())
    sampler = data.EpochSampler(len(ds), 0, shuffle=False, random_site=False)
    loader = data.make_loader(ds, sampler, 4, num_workers=1, pin_memory=False, drop_last=False)
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (len(ds), 2, 6, 16, 16) and x.dtype == torch.uint8
    assert torch.equal(torch.cat([b[3] for b in batches]), torch.arange(len(ds)))


def test_missing_stack_and_site_errors(data_screen, tmp_path):
    index = data.StackIndex.build(data_screen.stacks[:1])
    wells = data.well_table(metadata.read_sites(data_screen.sites))
    with pytest.raises(InputError, match="no stack given for experiment"):
        index.locate(wells)
    with pytest.raises(InputError, match="also in"):
        data.StackIndex.build(data_screen.stacks[:1] * 2)
    with pytest.raises(InputError, match="HUVEC-01 plate 2"):
        data.normalization_arrays(
            data_screen.stats[:1], "plate", data.StackIndex.build(data_screen.stacks).keys
        )
