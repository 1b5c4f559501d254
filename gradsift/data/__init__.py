"""Data: the in-memory :class:`Dataset`, built-in data sets, user files, label corruption,
and torch Datasets / DataLoaders as training sources (:func:`indexed`, :func:`examples`).

Built-in data never touches the network: scikit-learn's ``digits`` ships inside
scikit-learn, and MNIST-1D is generated locally with the ``mnist1d`` package's generator.
Every example carries a stable integer ``example_id`` so that scores and label issues can
be joined back to the data.
"""

from .builtin import BUILTIN, load_digits, load_mnist1d
from .dataset import Dataset, validate
from .files import load, load_csv, load_npz
from .noise import asymmetric_noise, corrupt, random_labels, symmetric_noise
from .sources import Examples, IndexedDataset, examples, indexed, to_device

__all__ = [
    "BUILTIN", "Dataset", "validate", "load_digits", "load_mnist1d", "load", "load_csv",
    "load_npz", "asymmetric_noise", "corrupt", "random_labels", "symmetric_noise", "Examples",
    "IndexedDataset", "examples", "indexed", "to_device",
]
