"""Reproductions of the three papers, one package each: its grids per scale, its runs, its figures and tables."""
