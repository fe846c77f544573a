"""AFNet-M in PyTorch: the network, the scan datasets and renderer, protocols and training."""
