"""The configuration reference (docs/configuration.md): a Markdown table generated from the schema,
each key with its default and its help; scripts/config-reference writes it, and a test fails
when the page differs."""

from __future__ import annotations

from .schema import REQUIRED, SCHEMA, Key


def shown_default(key: Key) -> str:
    """A key's default as the reference shows it."""
    d = key.default
    if key.shown is not None:
        return key.shown
    if d is REQUIRED:
        return "required"
    if d is None:
        return "none"
    if isinstance(d, float) and d.is_integer():
        d = int(d)
    return f"`{list(d) if isinstance(d, tuple) else d}`"


def reference() -> str:
    """The reference table, from SCHEMA."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, keys in SCHEMA.items():
        rows += [f"| `{section}.{key.name}` | {shown_default(key)} | {key.help} |" for key in keys]
    return "\n".join(rows) + "\n"
