"""What users run: the ``dip-fast`` command line, its ``batch`` mode and the demo."""
