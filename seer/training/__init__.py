"""Training stages (Lightning modules), their losses, callbacks and loggers. Never imported by inference code."""
