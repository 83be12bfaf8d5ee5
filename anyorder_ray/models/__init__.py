"""Model implementations. Importing a model package registers it with the HF Auto classes."""
