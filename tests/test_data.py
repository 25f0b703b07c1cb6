import gzip

import numpy as np
import pytest
import torch

from pyro_vae import DataConfig, DataError, load_dataset
from pyro_vae.data import DeviceBatches, binarize, load_mnist_sample, read_idx, read_idx_split
from pyro_vae.data.batching import binarized_rows, counter_uniform

from .helpers import write_idx


def test_read_idx_reads_raw_and_gzip_files(tmp_path, rng):
    array = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    for compress in (False, True):
        path = write_idx(tmp_path / f"a{compress}", array, compress=compress)
        np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b"\x08\x08" + b[2:], "magic number"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\x00", "promises"),
    (lambda b: b[:6], "truncated"),
])
def test_read_idx_names_the_problem_with_a_bad_file(tmp_path, rng, corrupt, message):
    good = write_idx(tmp_path / "good", rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8))
    bad = tmp_path / "bad"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        read_idx(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_read_idx_reports_a_broken_gzip_stream(tmp_path, rng):
    path = write_idx(tmp_path / "x.gz", rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8),
                     compress=True)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_images_and_labels_must_agree_in_count(idx_folder, rng):
    write_idx(idx_folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 19, dtype=np.uint8))
    with pytest.raises(DataError, match="20 images but .* 19"):
        read_idx_split(idx_folder, "test")


def test_flat_folder_loads_as_tensors_scaled_like_to_tensor(idx_folder):
    data = load_dataset(DataConfig(dataset="mnist", data_dir=str(idx_folder), download=False))
    assert data.train_x.shape == (60, 784) and data.test_x.shape == (20, 784)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    raw = read_idx(idx_folder / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(data.train_x, raw.float().reshape(60, -1) / 255)


def test_torchvision_layout_is_found(idx_folder, tmp_path):
    root = tmp_path / "root"
    (root / "FashionMNIST").mkdir(parents=True)
    idx_folder.rename(root / "FashionMNIST" / "raw")
    data = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(root), download=False))
    assert data.name == "fashion-mnist" and len(data.train_x) == 60


def test_pixels_match_torchvision_to_tensor(idx_folder):
    from PIL import Image
    from torchvision.transforms import ToTensor

    data = load_dataset(DataConfig(dataset="mnist", data_dir=str(idx_folder), download=False))
    raw = read_idx(idx_folder / "train-images-idx3-ubyte.gz")
    for i in range(3):
        expected = ToTensor()(Image.fromarray(raw[i].numpy(), mode="L")).reshape(-1)
        torch.testing.assert_close(data.train_x[i], expected, rtol=0, atol=0)


def test_explicit_data_set_that_cannot_be_had_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="DataConfig.data_dir"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False))
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset(DataConfig(dataset="cifar"))


def test_auto_falls_back_to_the_sample_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path))
    data = load_dataset(DataConfig(dataset="auto", download=False))
    assert data.name == "mnist-sample"
    assert "mnist-sample" in caplog.text


def test_auto_uses_full_mnist_when_present(idx_folder):
    data = load_dataset(DataConfig(dataset="auto", data_dir=str(idx_folder)))
    assert data.name == "mnist" and len(data.train_x) == 60


def test_mnist_sample_is_a_fixed_stratified_split():
    a, b = load_mnist_sample(), load_mnist_sample()
    assert a.train_x.shape == (4500, 784) and a.test_x.shape == (500, 784)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert torch.bincount(a.test_y).tolist() == [50] * 10
    assert torch.bincount(a.train_y).tolist() == [450] * 10
    assert a.train_x.min() == 0 and a.train_x.max() == 1
    assert ((a.train_x > 0) & (a.train_x < 1)).any()  # gray-scale, not binary


def test_real_mnist_test_set_reads(shared_mnist):
    x, y = read_idx_split(shared_mnist, "test")
    assert x.shape == (10000, 784) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x.min() == 0 and x.max() == 1
    # the MNIST test set's mean pixel intensity, 0.1325 (the well-known normalization constant)
    assert abs(x.mean().item() - 0.1325) < 0.001


def test_static_binarization_repeats_by_seed():
    x = torch.rand(100, 784)
    a, b, c = binarize(x, 3), binarize(x, 3), binarize(x, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(a.mean() - x.mean()) < 0.01


def test_fixed_binarization_ignores_the_global_random_stream():
    x = torch.rand(50, 784)
    torch.manual_seed(1)
    a = binarize(x, 3)
    torch.manual_seed(2)
    assert torch.equal(a, binarize(x, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare")
def test_the_binarized_test_set_is_the_same_on_cpu_and_cuda():
    from pyro_vae import RunConfig
    from pyro_vae.runner.resolve import resolve

    config = RunConfig()
    config.data.dataset, config.data.test_limit, config.data.train_limit = "mnist-sample", 200, 64
    on_cpu = resolve(config, torch.device("cpu")).test_x
    on_cuda = resolve(config, torch.device("cuda")).test_x
    assert on_cuda.is_cuda and torch.equal(on_cpu, on_cuda.cpu())


def test_device_batches_visit_every_image_once_per_epoch():
    x = torch.arange(10.0).unsqueeze(1)  # (10, 1)
    batches = DeviceBatches(x, batch_size=4)
    assert len(batches) == 3
    seen = torch.cat(list(batches.batches(batches.permutation(1))))
    assert sorted(seen.squeeze(1).tolist()) == list(range(10))
    perm = batches.permutation(2)
    tail = torch.cat(list(batches.batches(perm, start=1)))
    torch.testing.assert_close(tail.squeeze(1), x[perm[4:]].squeeze(1))


def test_images_apart_come_in_batches_of_their_own_spread_through_the_epoch():
    x = torch.arange(1000.0).unsqueeze(1)
    apart = torch.zeros(1000, dtype=torch.bool)
    apart[::7] = True  # 143 labelled images: batches of 100 and 43 among 5 others
    batches = DeviceBatches(x, batch_size=100, seed=2, apart=apart)
    assert len(batches) == 11
    perm = batches.permutation(1)
    assert sorted(perm.tolist()) == list(range(1000))
    kinds = [bool(apart[index].all()) if apart[index].any() else False
             for index in batches.indices(perm)]
    for index in batches.indices(perm):
        assert apart[index].all() or not apart[index].any()  # never mixed
    assert sum(kinds) == 2 and not kinds[0] and not kinds[-1]  # spread, not at the ends
    assert not torch.equal(perm, batches.permutation(2))
    assert torch.equal(perm, DeviceBatches(x, 100, seed=2, apart=apart).permutation(1))
    tail = torch.cat(list(batches.indices(perm, start=3)))  # a resume at batch 3
    assert torch.equal(tail, perm[batches.offsets[3]:])


def test_images_apart_can_be_cycled_after_every_k_other_batches():
    x = torch.arange(1000.0).unsqueeze(1)
    apart = torch.zeros(1000, dtype=torch.bool)
    apart[:30] = True  # 30 labelled images, 970 others in 10 batches of 100
    batches = DeviceBatches(x, batch_size=100, seed=1, apart=apart, apart_every=2)
    perm = batches.permutation(1)
    kinds = [bool(apart[index].all()) for index in batches.indices(perm)]
    assert kinds == [False, True, False] * 5  # a labelled batch after every 2 others
    seen = torch.cat([index for index in batches.indices(perm) if apart[index].all()])
    assert len(seen) == 5 * 30 and torch.bincount(seen, minlength=30).tolist() == [5] * 30
    rest = torch.cat([index for index in batches.indices(perm) if not apart[index].any()])
    assert sorted(rest.tolist()) == list(range(30, 1000))  # the others once each


def test_dynamic_binarization_draws_fresh_images():
    x = torch.full((50, 784), 0.5)
    batches = DeviceBatches(x, batch_size=50, dynamic=True)
    perm = torch.arange(50)
    first, second = next(batches.batches(perm)), next(batches.batches(perm))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)


def test_dynamic_binarization_draws_each_pixel_with_its_gray_level_as_probability():
    """P(1) = x: 0 and 1 stay exactly, gray levels agree to 5 binomial standard errors."""
    torch.manual_seed(0)
    levels = torch.tensor([0.0, 0.01, 0.25, 0.5, 0.9, 1.0])
    x = levels.repeat(100, 1)
    batches = DeviceBatches(x, batch_size=100, dynamic=True)
    draws = torch.stack([batches.gather(torch.arange(100)) for _ in range(200)])
    assert draws.dtype == x.dtype and set(draws.unique().tolist()) <= {0.0, 1.0}
    freq = draws.mean(dim=(0, 1))
    assert freq[0] == 0 and freq[-1] == 1
    se = (levels * (1 - levels) / draws[..., 0].numel()).sqrt()
    assert torch.all((freq - levels).abs() <= 5 * se), (freq, levels)


def lowbias32_counter(n: int, k0: int, k1: int) -> int:
    """The counter generator's 24 bits for element ``n``, from Wellons' C on Python ints."""
    def mix(h):
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        return h ^ (h >> 16)
    return mix(mix(n ^ (k0 & 0xFFFFFFFF)) ^ (k1 & 0xFFFFFFFF)) >> 8


@pytest.mark.parametrize("k0, k1", [(0, 0), (-2**31, 2**31 - 1), (0x1234567, -0x7654321)])
def test_counter_uniform_is_lowbias32_of_the_element_index_under_the_key(k0, k1):
    """Element n of the draws is lowbias32(lowbias32(n ^ k0) ^ k1) >> 8 over 2^24, exactly:
    the torch integer arithmetic (masked shifts, wrapping products) is the unsigned C,
    across the eager blocks' seams and at the extreme keys."""
    u = counter_uniform((3, 70_000), torch.tensor([k0, k1], dtype=torch.int32)).flatten()
    positions = [0, 1, 2, 65_535, 65_536, 65_537, 131_071, 131_072, 209_999]
    assert u[positions].tolist() == [lowbias32_counter(n, k0, k1) / 2**24 for n in positions]
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1


def test_counter_uniforms_are_uniform_and_independent_of_neighbours_and_key_bits():
    """2^20 draws: a flat histogram (chi-square of 256 bins within 5 of its standard
    deviations), each of the 24 bits fair, no correlation between neighbouring elements,
    nor between the draws of two keys one bit apart (each within 5 standard errors)."""
    n = 2**20
    a = counter_uniform((n,), torch.tensor([12345, 678], dtype=torch.int32)).double()
    b = counter_uniform((n,), torch.tensor([12345, 679], dtype=torch.int32)).double()
    counts = torch.histc(a, bins=256, min=0, max=1)
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert abs(chi2 - 255) < 5 * (2 * 255) ** 0.5, chi2
    bits = (a * 2**24).long()
    for k in range(24):
        assert abs(float(((bits >> k) & 1).double().mean()) - 0.5) < 5 * 0.5 / n**0.5, k

    def corr(p, q):
        return float(torch.corrcoef(torch.stack([p, q]))[0, 1])
    assert abs(corr(a[:-1], a[1:])) < 5 / n**0.5
    assert abs(corr(a, b)) < 5 / n**0.5


def test_dynamic_binarization_is_the_counter_uniforms_below_the_pixels():
    x = torch.rand(20, 30)
    index = torch.tensor([3, 0, 19, 3])
    key = torch.tensor([7, -9], dtype=torch.int32)
    expected = (counter_uniform((4, 30), key) < x[index]).float()
    assert torch.equal(binarized_rows(x, index, key), expected)


def test_a_batch_s_key_comes_from_the_global_torch_rng():
    """Reseeding the global generator repeats a dynamic batch (a checkpoint's RNG state
    resumes binarization exactly); the stream moves on between batches."""
    batches = DeviceBatches(torch.full((40, 50), 0.5), batch_size=40, dynamic=True)
    index = torch.arange(40)
    torch.manual_seed(5)
    first, second = batches.gather(index), batches.gather(index)
    torch.manual_seed(5)
    assert torch.equal(batches.gather(index), first) and not torch.equal(first, second)


def test_gzip_detected_by_content_not_name(tmp_path, rng):
    array = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    raw = write_idx(tmp_path / "plain", array)
    (tmp_path / "zipped-no-suffix").write_bytes(gzip.compress(raw.read_bytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "zipped-no-suffix"), array)


def test_ranks_split_each_global_batch_of_a_single_process():
    x = torch.arange(23.0).unsqueeze(1)
    single = DeviceBatches(x, batch_size=6, seed=3)
    ranks = [DeviceBatches(x, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 12 images each after padding 23 -> 24
    single_batches = list(single.batches(single.permutation(5)))
    rank_batches = [list(b.batches(b.permutation(5))) for b in ranks]
    for i in range(3):  # the complete global batches
        together = torch.cat([rank_batches[0][i], rank_batches[1][i]]).squeeze(1)
        assert sorted(together.tolist()) == sorted(single_batches[i].squeeze(1).tolist())
    assert not torch.equal(single.permutation(1), single.permutation(2))  # reshuffled per epoch
