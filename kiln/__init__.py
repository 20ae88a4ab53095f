"""Kiln: train, export, quantize and serve research models.

Importing ``kiln`` points BentoML's model store at Kiln's project-local state directory (see
:mod:`kiln.settings`) before BentoML is imported anywhere, so a fresh clone starts with a fresh store
and tests never touch the user's home.
"""

from kiln.settings import configure_environment

__version__ = "0.1.0"

configure_environment()
