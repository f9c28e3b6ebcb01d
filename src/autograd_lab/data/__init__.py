"""TODO: the data subpackage."""
