"""TODO: the observe subpackage."""
