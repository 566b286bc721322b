"""The ``shoal`` command line: runs each part of the mesh and talks to running ones."""
