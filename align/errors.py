"""One error type for bad user input: the CLI prints its message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (recipe, data, model path, eval file). The message names the file, key or row."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason the message states in one line (a non-finite loss, a rollout server
    that stopped answering): the CLI prints it and exits with status 1, without a traceback."""


def fail(message: str) -> "UserError":
    """Build a UserError; use as ``raise fail("recipe.yaml: key 'x': ...")``."""
    return UserError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for a one-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
