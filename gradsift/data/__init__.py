"""Data: the in-memory :class:`Dataset`, built-in data sets, user files, label corruption,
and torch Datasets / DataLoaders as training sources (:func:`indexed`, :func:`examples`).

Built-in data never touches the network: scikit-learn's ``digits`` ships inside
scikit-learn, and MNIST-1D is generated locally with the ``mnist1d`` package's generator.
Every example carries a stable integer ``example_id`` so that scores and label issues can
be joined back to the data.
"""

from .builtin import BUILTIN, load_digits, load_mnist1d
from .dataset import MAX_CLASSES, Dataset, holdout, validate
from .by_name import load
from .files import encode_labels, load_csv, load_npz, load_parquet
from .hf import HFExamples, hf_examples, load_hf, load_hf_table
from .images import ImageFolder, image_folder, load_image_folder
from .noise import asymmetric_noise, corrupt, random_labels, symmetric_noise
from .sources import Examples, IndexedDataset, examples, indexed, to_device

__all__ = [
    "BUILTIN", "MAX_CLASSES", "Dataset", "holdout", "validate", "load_digits", "load_mnist1d",
    "encode_labels", "load", "load_csv", "load_npz", "load_parquet", "ImageFolder", "image_folder",
    "load_image_folder", "HFExamples", "hf_examples", "load_hf", "load_hf_table", "asymmetric_noise", "corrupt", "random_labels", "symmetric_noise", "Examples",
    "IndexedDataset", "examples", "indexed", "to_device",
]
