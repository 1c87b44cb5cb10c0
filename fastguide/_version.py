"""The one place fastguide's version is written: pyproject.toml reads it (`[tool.setuptools.dynamic]`),
`fastguide.__version__` re-exports it."""
__version__ = "0.2.0"
