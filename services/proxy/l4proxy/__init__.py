"""layer4lab's layer-4 mTLS load-balancing proxy."""

__version__ = "0.1.0"
