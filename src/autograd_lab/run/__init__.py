"""TODO: the run subpackage."""
