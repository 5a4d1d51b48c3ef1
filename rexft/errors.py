"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class RexftError(Exception):
    """Bad input named precisely: a missing dataset field, a corrupt checkpoint, a wrong base model."""
