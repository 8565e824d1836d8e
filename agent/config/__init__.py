"""Configuration: read the YAML file, validate all of it at once, hand out frozen settings.

Every problem is reported together, each naming its key (``At 'dicom.port': ...``), so that an
administrator fixes the file in one pass instead of one restart per typo. The rules for each
kind of value live in the annotated types below (parse, check, format back); the models only
say which key has which type and default.
"""

from agent.config.loading import load_config, parse_config
from agent.config.models import (
    AuditSettings,
    CloudSettings,
    DicomSettings,
    HealthSettings,
    Peer,
    ServeSettings,
    Settings,
    SpoolSettings,
    StudySettings,
    UploadSettings,
    WatchDir,
    WatchSettings,
)
from agent.config.problems import ConfigError
from agent.config.rules import redact_url
from agent.config.units import parse_duration, parse_size

__all__ = [
    "AuditSettings",
    "CloudSettings",
    "ConfigError",
    "DicomSettings",
    "HealthSettings",
    "Peer",
    "ServeSettings",
    "Settings",
    "SpoolSettings",
    "StudySettings",
    "UploadSettings",
    "WatchDir",
    "WatchSettings",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "redact_url",
]
