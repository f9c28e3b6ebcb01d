"""autograd-lab: a training-dynamics research harness.

Importing the package is cheap on purpose: torch and Lightning are imported by the modules that
need them, so `autograd-lab train --help` and `--cfg job` answer without paying for them.
"""

__version__ = "0.1.0"

# The notebook API (api.py), loaded on first use so that importing the package stays cheap.
__all__ = ["run", "multirun", "landscape", "show", "title_of", "quiet", "Run", "Sweep"]


def __getattr__(name: str):
    if name in __all__:
        import autograd_lab.api as api

        return getattr(api, name)
    raise AttributeError(f"module 'autograd_lab' has no attribute {name!r}")
