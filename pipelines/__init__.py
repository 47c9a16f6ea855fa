"""Ready pipelines and the bundled small models."""
