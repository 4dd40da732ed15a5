"""Reproductions of the three papers: experiment grids per scale and figure/table builders."""
