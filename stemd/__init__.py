"""stemd: a live auto-encoder denoiser for fast-scan STEM images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stemd")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__", "Denoiser"]


def __getattr__(name: str):
    if name == "Denoiser":  # imported lazily: `import stemd` must not pay for torch
        from stemd.pipeline import Denoiser

        return Denoiser
    raise AttributeError(name)
