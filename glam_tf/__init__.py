"""glam-tf: GLAM (global-local attention) for instance-level image retrieval, in Keras 3."""

__version__ = "0.1.0"
