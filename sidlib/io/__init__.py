"""Checkpoint I/O: the restricted EDM pickle reader, our safetensors format, the registry of public networks,
cached downloads, atomic writes, training states, run logs and JSON (EDM's ``torch_utils/persistence.py`` and
``dnnlib/util.py`` roles)."""
