"""Test utilities: tiny random-weight VLMs of every supported family and inputs that fit them (public, for tests)."""

from .tiny_models import *  # noqa: F403
