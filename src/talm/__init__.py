"""talm: train a language model, from raw text to a trained GPT, on your own hardware.

The public API is re-exported here lazily, so `import talm` stays cheap (the tokenizer stage never imports
torch).
"""

__version__ = "0.1.0"
