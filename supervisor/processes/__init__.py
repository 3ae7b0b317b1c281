"""The processes layer: the app's two slots and everything about a process from outside it:
launching (launch, slots), /proc (procs), readiness and smoke checks (probes), connections on a
port (sockets) and the drain wait (drain), and its output (logpump writes it, logs reads it)."""
