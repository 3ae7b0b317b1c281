"""The config layer: the one declarative schema of bluegreen.toml (schema.py), what this machine
offers it (host.py), and the reference the manual is generated from (reference.py). Imports
nothing above it."""
