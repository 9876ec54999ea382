"""The embedded demo run (``run/``) and the sha256 manifest of its files (``manifest.json``).

The script that builds it lives outside the package: ``tools/build_demo.py``.
"""
