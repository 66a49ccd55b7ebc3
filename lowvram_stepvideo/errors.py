"""The one documented exception type of the package: every one-line error derives from it."""


class StepVideoError(Exception):
    pass
