"""The config layer: the one declarative schema of bluegreen.toml (schema.py), what it checks on
this machine, and the reference the README is generated from. Imports nothing above it."""
