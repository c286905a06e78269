"""One exception type for bad user input: the CLI prints its message (which names the file, line or key) and
exits non-zero instead of showing a traceback."""


class GritJaxError(ValueError):
  """Bad input from the user: a malformed file, an unknown config key, missing weights, a shape mismatch."""
