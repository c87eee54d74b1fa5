"""The GPT: one readable model file and its config."""
