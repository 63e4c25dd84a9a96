"""Files in and out, below everything: the data folder and cache, atomic writes, verified downloads,
the registry of pinned files, the hub, and family-neutral checkpoint I/O (safetensors, shards, meta-
device building, tensor checks).
"""
