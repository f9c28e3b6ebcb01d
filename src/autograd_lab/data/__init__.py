"""The data: the safe CIFAR-10 reader and its decode cache (`cifar`), the synthetic data
written in the same on-disk format (`synthetic`), the resident loader and DataModule
(`loader`)."""
