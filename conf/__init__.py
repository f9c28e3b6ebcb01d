"""Hydra configs of autograd-lab (the top-level conf/ folder, packaged as autograd_lab.conf)."""
