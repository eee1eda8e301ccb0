"""The ``caption_cider`` evaluate module (its script is ``caption_cider.py``)."""
