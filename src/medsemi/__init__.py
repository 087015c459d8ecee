"""medsemi: semi-supervised medical image segmentation with scarce labels and many domains."""

__version__ = "0.1.0"
