"""Device-resident in-memory datasets and the batched crop + flip (issue 16, section 1)."""
import pytest
import torch

from nc_lib.data import ArrayDataset, make_loader, random_crop_flip, set_loader_epoch, without_augmentation


def per_image_crop_flip(x, padding=4):
    """The former per-image loop, the reference the batched version must reproduce bit for bit."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offs = torch.randint(0, 2 * padding + 1, (B, 2))
    flips = torch.rand(B) < 0.5
    out = torch.empty_like(x)
    for i in range(B):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        crop = padded[i, :, dy:dy + H, dx:dx + W]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (17, 1, 28, 20)])
def test_batched_crop_flip_equals_the_per_image_loop_for_a_seed(shape):
    x = torch.randn(shape)
    torch.manual_seed(3)
    expected, after = per_image_crop_flip(x), torch.rand(4)
    torch.manual_seed(3)
    got = random_crop_flip(x)
    assert torch.equal(got, expected)
    assert torch.equal(torch.rand(4), after)  # the same draws from the global generator, no more, no fewer
    assert got.is_contiguous()
    # both flips and several offsets were drawn, so the comparison covers every branch
    torch.manual_seed(3)
    offs, flips = torch.randint(0, 9, (shape[0], 2)), torch.rand(shape[0]) < 0.5
    assert flips.any() and not flips.all() and len(offs.unique()) > 2


def _images(n=40, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ArrayDataset(raw, torch.arange(n) % C, num_classes=C, mean=torch.full((3, 8, 8), 0.5),
                        std=torch.full((3, 8, 8), 0.25), scale=255.0, augment=True)


def test_to_the_device_it_is_on_is_the_same_dataset():
    ds = _images()
    assert ds.to("cpu") is ds and ds.device == torch.device("cpu")
    assert ArrayDataset(ds.raw, ds.targets, num_classes=4, mean=ds.mean, std=ds.std, device="cpu").device.type == "cpu"


def test_replaced_labels_are_served():
    ds = _images()
    ds.targets = (ds.targets + 1) % 4
    _, y = ds.get_batch([0, 1, 2])
    assert y.tolist() == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_resident_batches_equal_the_cpu_batches_for_a_seed():
    ds = _images()
    on_gpu = ds.to("cuda")
    assert on_gpu.raw.dtype == torch.uint8 and on_gpu.raw.is_cuda and on_gpu.targets.device.type == "cpu"
    for data in (ds, without_augmentation(ds)):
        cpu_loader = make_loader(data, 16, shuffle=True, seed=7)
        gpu_loader = make_loader(data.to("cuda"), 16, shuffle=True, seed=7)
        for epoch in (0, 3):
            set_loader_epoch(cpu_loader, epoch)
            set_loader_epoch(gpu_loader, epoch)
            torch.manual_seed(epoch)
            cpu = list(cpu_loader)
            torch.manual_seed(epoch)
            gpu = list(gpu_loader)
            for (xc, yc), (xg, yg) in zip(cpu, gpu):
                assert xg.is_cuda and yg.is_cuda
                assert torch.equal(yc, yg.cpu())
                torch.testing.assert_close(xc, xg.cpu(), rtol=1e-6, atol=1e-6)
