"""JSON schemas of the tables and of the config file; shipped in the wheel as pipeline.schemas."""
