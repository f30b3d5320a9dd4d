"""skillguard: kernel-enforced permission manifests for AI-agent skills."""

__version__ = "0.1.0"
