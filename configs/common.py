"""Helpers shared by the configs."""


def parse_arg(arg, allowed, expected):
  """`'runlocal,mode=tangent'` -> `{'runlocal': True, 'mode': 'tangent'}`.

  Args:
    arg: the text after `:` in `--config file.py:ARG` (or None).
    allowed: the keys this config accepts.
    expected: how the error message describes the accepted arguments.

  Raises:
    ValueError: naming any unknown key.
  """
  args = dict(a.split("=", 1) if "=" in a else (a, True)
              for a in (arg or "").split(",") if a)
  unknown = set(args) - set(allowed)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; "
                     f"expected {expected}")
  return args
