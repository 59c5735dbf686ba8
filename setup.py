"""For Apache Beam's `--setup_file`: all metadata is in pyproject.toml.

Beam 2.77 builds the package it stages for remote workers with `python -m build --sdist`
and, when the `build` module is not installed, with `python setup.py sdist`, which needs
this file (a `--setup_file=pyproject.toml` has no such fallback).
"""

from setuptools import setup

setup()
