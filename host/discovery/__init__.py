"""Finding boards: mDNS (``_edgetune._tcp``) merged with the tracker's view."""
