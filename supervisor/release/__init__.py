"""The release layer: a swap as named phases (phases.py) and the executor that does each phase's
I/O (executor.py); the app that owns both slots (app.py); pause, rollout, watch and warm
rollback (controller.py, rollout.py, verdict.py); hooks; taking over what a killed daemon left
(adoption.py, takeover.py); the history of swaps."""
