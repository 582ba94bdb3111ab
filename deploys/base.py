# Only the host base: packages, admin user, sshd, ufw, fail2ban, upgrades, time, sysctl.
from roles.base import base

base()
