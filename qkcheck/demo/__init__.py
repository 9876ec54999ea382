"""The embedded demo run (``run/``) and the script that builds it (``build.py``)."""
