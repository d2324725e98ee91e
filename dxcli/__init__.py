"""dx: vision-language deepfake detection (DX-LLaVA + PRPO)."""

__version__ = "0.1.0"
