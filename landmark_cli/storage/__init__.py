"""On-disk state: the KV store of read documents (store) and the folder index (manifest)."""
