"""Stage 1, the byte-level BPE tokenizer (no torch): the Tokenizer, its file formats, fast encoding, training."""
