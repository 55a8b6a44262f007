"""The decision stage: anomaly maps to regions and verdicts, one verdict per acquired frame."""
