"""Configuration: batch.yaml, networks, resource sets and templates, validated once at load."""
