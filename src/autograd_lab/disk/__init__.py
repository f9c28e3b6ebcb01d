"""TODO: the disk subpackage."""
