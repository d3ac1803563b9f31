"""Reading images, cohorts and the preprocessed cache."""

from medvlp.data.cache import CachedCohort
from medvlp.data.cohort import Cohort, CohortError, CohortSpec, load_cohort
from medvlp.data.image import ImageReadError, MedicalImage
from medvlp.data.readers import read_image

__all__ = [
    "CachedCohort",
    "Cohort",
    "CohortError",
    "CohortSpec",
    "ImageReadError",
    "MedicalImage",
    "load_cohort",
    "read_image",
]
