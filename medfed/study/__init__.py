"""Clinical-style validation studies: centralized vs federated vs local-only, with statistics."""

from medfed.study.config import StudyConfig, build_study_config, load_study_config
from medfed.study.runner import StudyError, StudyResult, run_study

__all__ = [
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "build_study_config",
    "load_study_config",
    "run_study",
]
