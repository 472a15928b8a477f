"""covidseg: COVID-19 infection segmentation on chest X-rays (COVID-QU-Ex), as a DVC pipeline."""

__version__ = "0.1.0"
