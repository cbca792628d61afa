"""Configuration: YAML loaded with FILE:LINE errors, validated against the schema, frozen."""
