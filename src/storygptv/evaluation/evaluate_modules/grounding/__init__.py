"""The ``grounding`` evaluate module (its script is ``grounding.py``)."""
