"""File input/output: TIFF stacks, emitter/localisation tables, atomic writes."""
