"""The daemon layer: the long-lived process (process.py: signals, locks, start and shutdown),
its control socket, the monitor that restarts a crashed app, systemd's notify protocol and the
metrics endpoint."""
