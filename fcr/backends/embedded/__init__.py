"""The embedded default backend: Fashion-MNIST, the MiniLM text encoder, small diffusers UNets."""
