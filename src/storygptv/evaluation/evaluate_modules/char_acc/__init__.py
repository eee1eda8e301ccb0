"""The ``char_acc`` evaluate module (its script is ``char_acc.py``)."""
