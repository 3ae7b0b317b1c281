"""The proxy layer: nginx in front of the slots. front.py is what the rest sees (a FrontProxy);
nginx.py renders the config and switches by reload; runtime.py switches by nginx's lua table
(table.py talks to it, lua/bluegreen.lua is the program nginx runs); managed.py runs the nginx
the daemon owns."""
