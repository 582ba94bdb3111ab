"""What runs on the host: backup, restore, healthcheck, runbooks (see README, "Operations").

Every command is runnable as ``python scripts/<name>.py`` with the project's virtualenv, or as
``python -m scripts.<name>`` from the repository root.
"""
