"""Compressed models on disk: the config schema, saving, loading, inspection, and the
``transformers`` quantizer that makes ``from_pretrained`` build the compressed modules."""
