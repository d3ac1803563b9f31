"""medvlp: domain-specialized medical vision-language models from a hospital cohort."""

from medvlp.data import MedicalImage, read_image
from medvlp.models import load_model

__version__ = "0.1.0"
__all__ = ["MedicalImage", "__version__", "load_model", "read_image"]
