"""Datasets. Today: in-memory image arrays (scikit-learn digits, .npz files); the models/data issue
adds the torchvision CIFAR layout, ImageFolder and JSON split files."""

from roli.data.arrays import ArraySplit, load_arrays

__all__ = ["ArraySplit", "load_arrays"]
