"""Training: shards, offline tokenization, the resumable packing loader, the DeepSpeed engine, checkpoints, export."""
