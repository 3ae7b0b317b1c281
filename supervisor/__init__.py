"""bluegreen: zero-downtime blue/green releases of one web app behind nginx."""

__version__ = "0.1.0"
