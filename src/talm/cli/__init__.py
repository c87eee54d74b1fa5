"""Console scripts: one module each, that only parse, validate and call the library."""
