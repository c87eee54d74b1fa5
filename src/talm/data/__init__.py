"""Stage 2, text to token shards (no torch): sources and streaming, the data-directory format, the shard writer."""
