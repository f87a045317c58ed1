"""The one error of the retrieval package."""


class RetrievalError(ValueError):
    """A retrieval index or its input is missing, corrupt, inconsistent or not what the caller expected."""
