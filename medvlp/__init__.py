"""medvlp: domain-specialized medical vision-language models from a hospital cohort."""

from medvlp.data import MedicalImage, read_image

__version__ = "0.1.0"
__all__ = ["MedicalImage", "__version__", "read_image"]
