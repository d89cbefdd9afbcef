"""``edgetune demo``: the whole loop on this machine, with this machine as the board."""
