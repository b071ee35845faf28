"""The base of every error a user can fix (bad input, bad params, missing files).

The CLI prints these as one line naming the file or field and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class FacecalError(ValueError):
    """Bad input: the message names the file, row or field and says what is wrong."""
