"""The ``caption_bleu`` evaluate module (its script is ``caption_bleu.py``)."""
