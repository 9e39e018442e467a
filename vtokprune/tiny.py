"""Deprecated location, kept so older imports (`vtokprune.tiny`) still work: use `vtokprune.testing`."""

from .testing import *  # noqa: F403
