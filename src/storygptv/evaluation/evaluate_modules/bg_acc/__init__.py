"""The ``bg_acc`` evaluate module (its script is ``bg_acc.py``)."""
