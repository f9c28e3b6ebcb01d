"""TODO: the model subpackage."""
