"""The ground floor: how vlmlabel puts a file in place, changes one where it lies, and tells who else holds it.

Below ``sources``, ``destinations`` and ``run``, which all import it; it imports nothing of vlmlabel but
``errors`` and ``metadata`` (``tests/test_layering.py`` holds every package to its floor).
"""
