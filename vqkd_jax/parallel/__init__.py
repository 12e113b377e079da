"""Meshes, strategies (logical-axis rule tables) and the pmap baseline."""
