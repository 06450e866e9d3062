"""Package discovery (everything else is in pyproject.toml): every subpackage of `fts_mcp`, found rather than
listed so a new one cannot be left out of the wheel, plus `resources/` shipped as `fts_mcp.resources`."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fts_mcp", "fts_mcp.*"]), "fts_mcp.resources"],
      package_dir={"fts_mcp.resources": "resources"})
