"""Datasets and batches: Fashion-MNIST, CIFAR-10/100 and a synthetic set, held in memory.

``load_dataset(name, data_dir=None, **options)`` returns :class:`DatasetSplits` (uint8 images
``[N, C, H, W]``, int64 labels; train / fixed val / test). :class:`TensorLoader` turns a split
into normalised float batches, optionally augmented and resized, reproducible per epoch.
"""

from leanconv.data.datasets import clear_cache, dataset_names, load_dataset, parse_dataset_name
from leanconv.data.idx import read_idx, write_idx
from leanconv.data.loader import TensorLoader
from leanconv.data.safe_pickle import load_array_pickle
from leanconv.data.splits import DatasetSplits, ImageSplit, carve_validation, channel_stats

__all__ = [
    # datasets
    "load_dataset",
    "dataset_names",
    "parse_dataset_name",
    "clear_cache",
    "DatasetSplits",
    "ImageSplit",
    "carve_validation",
    "channel_stats",
    # batches
    "TensorLoader",
    # file formats
    "read_idx",
    "write_idx",
    "load_array_pickle",
]
