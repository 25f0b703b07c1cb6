"""Data: MNIST-style images as ``(N, 784)`` tensors in [0, 1], and device batching.

- :mod:`~pyro_vae.data.sources`: the data sets (``mnist``, ``fashion-mnist``,
  ``mnist-sample``, ``auto``), read with torchvision's IDX readers;
- :mod:`~pyro_vae.data.batching`: binarization and minibatches sliced on the device.

Seeds come from :mod:`pyro_vae.seeds`.
"""

from .batching import DeviceBatches, binarize, check_pixels
from .sources import (
    Dataset,
    default_cache_dir,
    load_dataset,
    load_mnist_sample,
    read_idx,
    read_idx_split,
)

__all__ = ["Dataset", "DeviceBatches", "binarize", "check_pixels",
           "default_cache_dir", "load_dataset", "load_mnist_sample", "read_idx",
           "read_idx_split"]
