"""Report: the seed's success criteria (verdict) and the tables / README section built from results."""
