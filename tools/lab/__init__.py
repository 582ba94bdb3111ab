"""The lab: a throwaway Debian 12 target host on this machine (see README, "The lab").

``target`` builds and runs it (debootstrap rootfs -> private dockerd -> systemd container with SSH on
127.0.0.1), ``deploy`` runs pyinfra against it, ``summary`` prints what a newcomer needs, and
``__main__`` is the CLI the Makefile calls (``python -m tools.lab up|deploy|summary|down|status``).
"""
