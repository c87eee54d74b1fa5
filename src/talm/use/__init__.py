"""Using a trained model: loading a checkpoint, sampling, exporting to Hugging Face transformers."""
