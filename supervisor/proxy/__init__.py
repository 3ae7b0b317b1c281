"""The proxy layer: nginx in front of the slots. front.py is what the rest sees (a FrontProxy, and a
TrafficSplit where the switch can split); render.py fills nginx's config from templates/; reload.py switches by
rewriting the upstream and reloading; runtime.py by nginx's lua table (table.py talks to it,
lua/bluegreen.lua is the program nginx runs, counters.py what it counts); master.py is any nginx
master seen from outside, managed.py the one the daemon runs, external.py yours; switch.py picks
the switch."""
