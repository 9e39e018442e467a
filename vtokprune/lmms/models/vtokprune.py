"""Legacy plugin-route location of the lmms-eval model (see :mod:`vtokprune.lmms.model`)."""

from ..model import VTokPruneLMM

__all__ = ["VTokPruneLMM"]
