"""TODO: the config subpackage."""
