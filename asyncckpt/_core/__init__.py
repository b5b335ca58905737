"""Core: the front doors, the save queue, the folder commit, the writer, the readers."""
