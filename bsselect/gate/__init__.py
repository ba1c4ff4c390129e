"""Will this config fit on that device? ``check``: device presets, ``[tool.bsselect]`` in
pyproject.toml, and the yes/no answer with its exit code, on a machine with no GPU."""
