"""Stage 2, text to token shards (no torch): config, sources (what to read) and streaming (reading it), the
data-directory format (manifest), the shard writer (writer, shard_dir) and the whole stage (prepare)."""
