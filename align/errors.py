"""One error type for bad user input: the CLI prints its message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (recipe, data, model path, eval file). The message names the file, key or row."""


def fail(message: str) -> "UserError":
    """Build a UserError; use as ``raise fail("recipe.yaml: key 'x': ...")``."""
    return UserError(message)
