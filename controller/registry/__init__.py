"""The model registry: models, versions, variants, signed content-addressed artifacts."""
