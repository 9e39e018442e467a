"""For lmms-eval's legacy plugin route (``LMMS_EVAL_PLUGINS=vtokprune.lmms``, deprecated upstream): model name ->
class in ``vtokprune.lmms.models.<name>``. The entry point in pyproject.toml is the preferred registration."""

AVAILABLE_MODELS = {"vtokprune": "VTokPruneLMM"}
