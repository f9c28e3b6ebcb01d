"""TODO: the sweep subpackage."""
