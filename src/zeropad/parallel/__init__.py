"""Multi-process training on PyTorch's own engine: process group (distributed) and DDP/FSDP2 (sharding)."""
